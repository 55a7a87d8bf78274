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
serve="python -m server.bench_serving throughput --device cuda --dtype float16 --batch 64 --preprocess-threads 12 --concurrency 192 --client-processes 4"
echo "=== served / offline, ViT-B/16 fp16, batch 64"
$serve --arch vit_base_patch16_224 2>&1 | tee "$out/serve-vitb.txt"
echo "=== host path alone (near-free model)"
$serve --near-free 2>&1 | tee "$out/serve-near-free.txt"
echo "=== memory, default config"
python -m server.bench_serving memory 2>&1 | tee "$out/memory.txt"
