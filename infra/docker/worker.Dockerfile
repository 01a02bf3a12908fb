# A worker: JAX, the engine and Celery. EXTRA=worker for CPUs, tpu for TPU VMs, cuda for NVIDIA GPUs.
# BASE_IMAGE: as in api.Dockerfile (scripts/docker-base.sh where no registry answers).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG EXTRA=worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDXL_COMPILE_CACHE_DIR=/cache/xla SDXL_TINY_DIR=/cache/tiny HF_HOME=/models/huggingface
RUN useradd --create-home --uid 10001 app \
 && mkdir -p /cache /models && chown app:app /cache /models
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# The dependencies on a layer of their own (empty packages stand in for the code): a code change does not
# reinstall JAX. constraints.txt: the versions CI last passed with (scripts/lock.sh).
RUN mkdir common api worker scripts \
 && touch common/__init__.py api/__init__.py worker/__init__.py scripts/__init__.py \
 && pip install -c constraints.txt "/app[${EXTRA}]" && rm -r common api worker scripts build
COPY common ./common
COPY api/__init__.py ./api/__init__.py
COPY worker ./worker
COPY scripts/__init__.py ./scripts/__init__.py
RUN pip install --no-deps --force-reinstall . && rm -r build
USER 10001
# Model folders and the compile cache live on volumes: a new container starts warm.
VOLUME ["/models", "/cache"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 CMD ["python", "-m", "worker.health"]
# SIGTERM is a warm shutdown: the batch in flight finishes and its results are recorded before exit.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker"]
