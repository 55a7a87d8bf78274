#!/usr/bin/env bash
# The GPU figures the README asks for, in one run on a machine with a CUDA GPU and the project installed
# (make install, or PYTHONPATH=. with torch, timm and the server's dependencies). Writes to ${OUT:-gpu-figures}/.
set -u
out=${OUT:-gpu-figures}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
bench="python -m mame_core.bench --device cuda --batch-size 256 --taus 1.0,0.9,0.85,0.8,0.7 --tome-r 8,13,16 --rounds 5 --iters 10 --warmup 3 --no-progress"
for dtype in float16 bfloat16; do
  echo "=== mame-bench ViT-B/16, batch 256, $dtype"
  $bench --dtype "$dtype" --json "$out/bench-b256-$dtype.json" 2>&1 | tee "$out/bench-b256-$dtype.txt"
done
serve="python -m server.bench_serving throughput --arch vit_base_patch16_224 --device cuda --dtype float16 --batch 64 --preprocess-threads 4 --seconds 3 --rounds 3"
echo "=== served / offline, ViT-B/16 fp16, batch 64, 16-image requests of 224 px JPEGs (default layout: front-ends)"
# Which server threads hold the GIL in the last window (py-spy, when installed: pip install py-spy).
profile=$(python -c "import shutil, sys, pathlib; print(1 if shutil.which('py-spy') or (pathlib.Path(sys.executable).parent / 'py-spy').exists() else '')")
$serve --client-processes 5 --concurrency 24 --images-per-request 16 --image-edge 224 \
  ${profile:+--gil-profile "$out/gil-16.txt"} 2>&1 | tee "$out/serve-vitb-16.txt"
echo "=== the same, 8 front-end processes"
$serve --client-processes 5 --concurrency 32 --images-per-request 16 --image-edge 224 --http-processes 8 2>&1 | tee "$out/serve-vitb-16-fe8.txt"
echo "=== the same, one server process (no front-ends; decode processes), the layout before front-ends"
$serve --client-processes 5 --concurrency 24 --images-per-request 16 --image-edge 224 --http-processes 0 --preprocess-threads 10 2>&1 | tee "$out/serve-vitb-16-one-process.txt"
echo "=== served / offline, one bundled photo per request"
$serve --client-processes 6 --concurrency 192 2>&1 | tee "$out/serve-vitb-1.txt"
echo "=== latency added at concurrency 1"
python -m server.bench_serving latency --arch vit_base_patch16_224 --device cuda --dtype float16 --requests 30 2>&1 | tee "$out/latency.txt"
echo "=== memory, default config"
python -m server.bench_serving memory 2>&1 | tee "$out/memory.txt"
