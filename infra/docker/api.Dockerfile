# The submit API: no JAX, no model. Small and non-root.
FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY common ./common
COPY api ./api
COPY worker/__init__.py ./worker/__init__.py
COPY scripts/__init__.py ./scripts/__init__.py
# The base install only: fastapi, celery, redis, boto3 (the worker extra brings JAX; the API never needs it).
RUN pip install --no-deps . && pip install -c constraints.txt .
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
