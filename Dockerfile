# softvq-serve image: one Dockerfile, two variants chosen by a build argument.
#
#   GPU (default): docker build -t softvq-serve:gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t softvq-serve:cpu .
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 before) for the
# RUN --mount=type=secret lines. No `# syntax=` line on purpose: BuildKit's built-in
# Dockerfile frontend is enough, and a syntax image would be one more pull from Docker Hub.
#
# pip settings for the build (a mirror, find-links, constraints, the CA of a TLS-inspecting
# proxy) go in as build secrets and never into a layer:
#   docker build --secret id=pip.conf,src=$HOME/.config/pip/pip.conf \
#                --secret id=pip-ca,src=/path/to/ca.crt ...      (pip.conf: cert = /run/secrets/pip-ca)
# deploy/smoke/run.sh builds this way on a host without Docker Hub or download.pytorch.org.
#
# Stages:  os-gpu | os-cpu   a Python runtime on the right base image
#          builder           a virtualenv with torch (from the PyTorch index of the variant)
#                            and the softvq-serve package, built from this source tree
#          runtime           the base again + that virtualenv + a non-root user; no compilers,
#                            no pip cache, no source tree
#
# The same image runs both processes (see README):
#   API:    softvq serve --host 0.0.0.0 --port 8000 [--redis URL]      (the default CMD)
#   worker: softvq worker --redis URL --metrics-port 9100
#
# Weights: released checkpoints are mounted read-only at /models and named with
# SOFTVQ_MODEL_ROOT=/models, SOFTVQ_TOKENIZERS and SOFTVQ_GENERATORS (JSON). With no model
# maps set, the demo weights bundled inside the package (model/demo_weights/) are served.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- GPU base: CUDA runtime + the distribution's Python (3.12 on Ubuntu 24.04) ------------
# gcc and the Python headers stay in the runtime image: triton compiles its small C launcher
# on first use, so torch.compile (SOFTVQ_BACKEND=compile, or auto's compile candidate) needs
# them on a GPU host; without them that backend is refused and auto keeps eager / ONNX.
FROM ${CUDA_IMAGE} AS os-gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# --- CPU base: plain Python 3.11 ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS os-cpu

# --- builder ------------------------------------------------------------------------------
FROM os-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_GPU=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
# PIP_CONFIG_FILE: the optional build secret `pip.conf` (pip ignores the path when no secret
# was given). Secrets are mounted for one RUN only; nothing of them stays in a layer.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    PATH=/opt/venv/bin:$PATH
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel

# torch first and in its own layer: it is by far the largest dependency and changes least.
# The CPU variant takes the CPU-only build, so the image carries no CUDA libraries.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ "$VARIANT" = "cpu" ]; then index="$TORCH_INDEX_CPU"; else index="$TORCH_INDEX_GPU"; fi \
 && pip install "torch==${TORCH_VERSION}" --index-url "$index"

# The package itself (not editable): model/, service/, loadtests/ and the bundled demo
# weights (package data). The GPU variant adds onnxruntime-gpu, triton and pynvml; both
# carry diffusers (the 2-D baseline's SD-VAE, the compare profile) and huggingface_hub
# (hf:// model paths).
WORKDIR /src
COPY . .
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ "$VARIANT" = "cpu" ]; then extras="onnx,baseline,hub"; else extras="gpu,baseline,hub"; fi \
 && pip install ".[${extras}]" \
 && softvq --help > /dev/null

# --- runtime ------------------------------------------------------------------------------
FROM os-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="softvq-serve" \
      org.opencontainers.image.description="SoftVQ-VAE tokenizers and SiT generators over HTTP" \
      org.opencontainers.image.licenses="MIT" \
      io.softvq.variant="${VARIANT}"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
# ~/.cache/softvq (ONNX exports, backend decisions) exists and belongs to that user, so a
# volume mounted there (docker-compose.yml: softvq-cache) starts out writable by it.
RUN groupadd --gid 10001 softvq \
 && useradd --uid 10001 --gid softvq --home-dir /home/softvq --create-home --shell /usr/sbin/nologin softvq \
 && mkdir -p /models /home/softvq/.cache/softvq \
 && chown softvq:softvq /models \
 && chown -R softvq:softvq /home/softvq/.cache

COPY --from=builder /opt/venv /opt/venv

# SOFTVQ_HOST: inside a container the API must listen on every interface (the settings
# default, 127.0.0.1, is right for a laptop and wrong here).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOFTVQ_HOST=0.0.0.0 \
    SOFTVQ_PORT=8000 \
    SOFTVQ_METRICS_PORT=9100

USER 10001:10001
WORKDIR /home/softvq
EXPOSE 8000 9100

# Liveness of the API process. A worker container has no API; docker-compose.yml and the
# Kubernetes manifests give it its own check (its /metrics port). HEALTHCHECK_URL overrides
# the target without rebuilding.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:%s/healthz' % os.environ.get('SOFTVQ_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["softvq"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
