# syntax=docker/dockerfile:1
# mame-serve image: multi-stage, non-root, CUDA-capable PyTorch.
# PyTorch's Linux x86_64 wheels on PyPI bundle the CUDA runtime, so one image runs on CPU nodes and,
# with the NVIDIA container toolkit providing the driver, on GPU nodes.
#   docker build -t mame-serve:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> -t mame-serve:0.1.0-cpu .   # smaller
#   docker build --build-arg PRELOAD_MODELS=vit_base_patch16_224.augreg_in21k_ft_in1k -t mame-serve:0.1.0-vitb .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Set by BuildKit (amd64, arm64, ...).
ARG TARGETARCH
# Empty: the Makefile's pair for the target architecture (x86_64: 2.14.1 / 0.29.1, aarch64: 2.9.1 / 0.24.1).
ARG TORCH_VERSION=""
ARG TORCHVISION_VERSION=""
# Empty: the default index (CUDA wheels). Set it to PyTorch's CPU index for a CPU-only image.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the largest and least often changed. Versions follow the Makefile's TORCH_SPEC.
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    case "$TARGETARCH" in \
        arm64) torch=2.9.1 torchvision=0.24.1 ;; \
        *) torch=2.14.1 torchvision=0.29.1 ;; \
    esac; \
    pip install --no-cache-dir "torch==${TORCH_VERSION:-$torch}" "torchvision==${TORCHVISION_VERSION:-$torchvision}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mame_core ./mame_core
COPY server ./server
COPY loadtest ./loadtest
COPY abtest ./abtest
# With the judge extra (mame-judge's ConfigMap split store: the kubernetes client). Its versions come from
# pyproject.toml like every other dependency's, hence no pin here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[judge]"

# Optional: bake pretrained weights into the image (timm model names, space separated). They land in
# the Hugging Face cache /opt/hf-cache that the server reads with HF_HUB_OFFLINE=1; empty = random weights
# unless weight files are mounted at /models (or a cache over /opt/hf-cache) at run time.
ARG PRELOAD_MODELS=""
ENV HF_HOME=/opt/hf-cache
RUN mkdir -p /opt/hf-cache && for arch in $PRELOAD_MODELS; do \
        python -c "import sys, timm; timm.create_model(sys.argv[1], pretrained=True)" "$arch" || exit 1; \
    done

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" mame \
    && useradd --system --uid "${UID}" --gid mame --home-dir /home/mame --create-home mame \
    && mkdir -p /etc/mame /models /var/cache/mame \
    && chown mame:mame /models /var/cache/mame
COPY --from=build /opt/venv /opt/venv
# The baked Hugging Face cache: owned by root (read-only to the server) and outside every volume, so that
# no volume mounted at /var/cache/mame or /models (an emptyDir, a compose volume) can hide it.
COPY --from=build /opt/hf-cache /opt/hf-cache
COPY --chown=mame:mame deploy/serving.yaml /etc/mame/serving.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/opt/hf-cache \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/var/cache/mame/torch \
    XDG_CACHE_HOME=/var/cache/mame/xdg \
    MPLCONFIGDIR=/tmp/matplotlib \
    MAME_CONFIG=/etc/mame/serving.yaml \
    MAME_HOST=0.0.0.0 \
    MAME_PORT=8000
# /models: weight files named in the serving config (weights: /models/<file>); /var/cache/mame: writable
# caches (torch, XDG). Neither holds the baked weights (/opt/hf-cache).
VOLUME ["/models", "/var/cache/mame"]
# Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER ${UID}:${UID}
WORKDIR /home/mame
EXPOSE 8000
# /healthz answers even while the device is busy; readiness (/readyz) is for load balancers.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"MAME_PORT\"]}/healthz', timeout=2)"]
# Settings come from MAME_* variables (docker run -e MAME_PORT=9000 keeps the healthcheck right) or flags.
ENTRYPOINT ["mame-serve"]
