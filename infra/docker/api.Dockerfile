# The submit API: no JAX, no model. Small and non-root.
# BASE_IMAGE: the official Python image by default; where no registry answers, scripts/docker-base.sh makes a
# stand-in from Debian's packages (BASE_IMAGE=sdxl-base:bookworm).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# The dependencies on a layer of their own (empty packages stand in for the code), so that a code change
# rebuilds only the layers below. The base install only: fastapi, celery, redis, boto3, numpy, pillow (the
# worker extra brings JAX; the API never needs it). constraints.txt: the versions CI last passed with.
RUN mkdir common api worker scripts \
 && touch common/__init__.py api/__init__.py worker/__init__.py scripts/__init__.py \
 && pip install -c constraints.txt . && rm -r common api worker scripts build
COPY common ./common
COPY api ./api
COPY worker/__init__.py ./worker/__init__.py
COPY scripts/__init__.py ./scripts/__init__.py
RUN pip install --no-deps --force-reinstall . && rm -r build
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
