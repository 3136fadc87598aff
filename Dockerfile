# syntax=docker/dockerfile:1
# The r2m image: `r2m serve` by default, `r2m worker` with that command. One image, two torch builds:
#
#   docker build -t r2m:latest .                           # GPU: CUDA runtime base + PyPI's torch==2.13.0 (CUDA 13.0)
#   docker build --build-arg VARIANT=cpu -t r2m:cpu .      # CPU: python slim base + torch 2.13.0 from the CPU index
#
# PyPI's torch 2.13.0 is built for CUDA 13.0 and needs an NVIDIA driver >= 580. For an older driver pick the CUDA
# 12.8 build and a matching base:
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t r2m:cu128 .
#
# Nothing secret is baked in: the API key, the Redis URL and a Hugging Face token come from the environment at run
# time. Downloaded models live in HF_HOME=/data/hf, a volume (compose: the `hf-cache` volume).

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# --- GPU base: the CUDA runtime, the distribution's Python 3.12, a CUDA torch ------------------------------------
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_SPEC=torch==2.13.0
# Empty: PyPI, whose Linux torch wheels are the CUDA build.
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive
# The base image moves its own package versions; pinning them here would break each rebuild of a newer base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# --- CPU base: no CUDA libraries at all (a few hundred MB instead of several GB) ----------------------------------
FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# --- the r2m image, on the base VARIANT names ---------------------------------------------------------------------
# base-${VARIANT} is one of the two stages above, not an image to pin.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    R2M_HOST=0.0.0.0 \
    R2M_PORT=8000 \
    R2M_WORKER_METRICS_PORT=9101 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    MALLOC_ARENA_MAX=2
# The malloc settings are those `r2m serve` and `r2m worker` set for themselves (service/allocator.py), here for
# every process of the image.

# The project from its own files; torch is already there and inside pyproject's range, so pip keeps it.
COPY pyproject.toml README.md /tmp/r2m-src/
COPY client /tmp/r2m-src/client
COPY data /tmp/r2m-src/data
COPY service /tmp/r2m-src/service
COPY trainer /tmp/r2m-src/trainer
COPY experiments /tmp/r2m-src/experiments
COPY cli /tmp/r2m-src/cli
RUN pip install --no-cache-dir /tmp/r2m-src \
    && rm -rf /tmp/r2m-src \
    && r2m --version

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it; the model cache belongs to it (a fresh named
# volume copies this ownership).
RUN groupadd --system --gid 10001 r2m \
    && useradd --system --uid 10001 --gid r2m --create-home --home-dir /home/r2m r2m \
    && mkdir -p /data/hf \
    && chown -R r2m:r2m /data/hf
VOLUME ["/data/hf"]
WORKDIR /home/r2m
USER 10001:10001

# 8000: the reward server (/score, /metrics); 9101: `r2m worker`'s /metrics.
EXPOSE 8000 9101
# Liveness of `r2m serve` (readiness is /readyz: 503 while the model loads). The worker's compose service and
# Kubernetes Deployment replace this with a probe of its metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('R2M_PORT', '8000'), timeout=4)"]
CMD ["r2m", "serve"]
