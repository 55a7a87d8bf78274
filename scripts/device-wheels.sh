#!/usr/bin/env bash
# Wheels for running the server and its benchmarks on a GPU machine that has torch, numpy, PIL, httpx,
# psutil and prometheus-client but no registry access (the lent H100/H200 machines): Python 3.12, x86-64.
#   scripts/device-wheels.sh [DIR]        # default build/whl (git-ignored)
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#         export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1; scripts/gpu-figures.sh
set -euo pipefail
dir=${1:-build/whl}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$dir" \
  fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-extensions \
  typing-inspection annotated-types annotated-doc uvicorn httptools python-multipart timm \
  opentelemetry-api py-spy
ls "$dir"
