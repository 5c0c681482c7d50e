# UltraCompress server: `uc serve` on a CUDA GPU (RTX 5090 / sm_120 included).
#
#   docker build -t ultracompress .
#   docker run --gpus all -p 8000:8000 -v "$PWD/work/packs:/models:ro" \
#       -e UC_PACK=/models/smollm2-135m-gsq5 ultracompress
#
# Installs exactly as the README does (`make setup`: torch==2.13.0, then this package), with pip pointed
# at PyTorch's CUDA 12.8 index so the torch wheel has kernels for sm_120. Configured by UC_* variables
# (every `uc serve` flag, see docs/SERVER.md); runs as a non-root user that also works under any UID.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/uc \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app

# The README's setup step, into /opt/uc; torch comes from the CUDA 12.8 index (2.13.0+cu128 wins over
# the plain 2.13.0 pin by PEP 440 ordering).
RUN PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" make setup VENV=/opt/uc PYTHON=python3 \
    && useradd --uid 10001 --gid 0 --home-dir /home/uc --create-home uc \
    && chgrp -R 0 /app /home/uc \
    && chmod -R g=u /app /home/uc

ENV PATH=/opt/uc/bin:$PATH \
    UC_HOST=0.0.0.0 \
    UC_PORT=8000 \
    UC_DEVICE=cuda \
    UC_PACK=/models/pack \
    UC_DRAIN_TIMEOUT=30

VOLUME ["/models"]
EXPOSE 8000
USER 10001

# Ready = weights loaded and a one-token warm-up passed (503 while loading or draining). No curl needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('UC_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["uc", "serve"]
