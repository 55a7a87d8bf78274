#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine with a CUDA GPU and the project installed (make install,
# or PYTHONPATH=. with torch, timm and the server's dependencies). Writes to ${OUT:-gpu-figures}/.
#   scripts/gpu-figures.sh [PART ...]     parts, in the order given (default: all, most wanted first):
#     serve16    served/offline, ViT-B/16 fp16 batch 64, 16-image requests: default layout (baseline, then MaMe
#                tau 0.85), then the single layout
#     fe8        the same with 8 front-end processes
#     serve1     served/offline, one bundled photo per request
#     engine     the engine process alone at full batches (python -m loadtest.engine): this host's CPU per
#                request of the one engine interpreter, 1-image and 16-image requests
#     latency    latency added at concurrency 1
#     memory     resident and GPU memory, default config
#     bench      mame-bench ViT-B/16: fp16 at batch 256 and 1024, bf16 at 256 (efficiency, mixed case)
#     profile    top CUDA kernels and op counts: timm, MaMe tau 0.85, ToMe r=13, fp16 batch 256
#     compile    mame-bench fp16 batch 256, each row eager and compiled (not in the default list: compiling takes minutes)
# Each serve part takes ~1-2 minutes (model load and warm-up included); `bench profile` fit one 8-minute call.
# SMOKE=1 runs every part on the CPU with tiny models and 1 s windows (`memory` with the sweep's ViT-Ti
# config; tests/test_loadtest_serving.py does, so that a broken flag is found on the CPU, not on the GPU
# machine). PYTHON: the interpreter (python3).
set -u -o pipefail  # a benchmark that fails fails its part, tee or not
out=${OUT:-gpu-figures}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Appended to each command (argparse keeps the last value of a flag): the CPU stand-ins of SMOKE=1.
smoke_serve=() smoke_latency=() smoke_bench=() smoke_memory=()
if [ -n "${SMOKE:-}" ]; then
  cpu=(--near-free --device cpu --dtype float32 --threads 1)
  smoke_serve=("${cpu[@]}" --seconds 1 --rounds 1 --client-processes 1 --concurrency 4 --preprocess-threads 1)
  smoke_latency=("${cpu[@]}" --requests 3)
  engine_s=1
  smoke_memory=(--config loadtest/configs/sweep-vit-tiny.yaml)  # ViT-Ti: the default config's ViT-B took ~40 s
  smoke_bench=(--device cpu --arch vit_tiny_patch16_224 --batch-size 2 --rounds 1 --iters 1 --warmup 0
               --model-kwargs '{"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2}')
else
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
serve() {
  $py -m loadtest.serving throughput --arch vit_base_patch16_224 --device cuda --dtype float16 --batch 64 \
    --preprocess-threads 4 --seconds 3 --rounds 3 "$@" "${smoke_serve[@]}"
}
# Which server threads hold the GIL in the last window (py-spy, when installed: pip install py-spy).
profile=$($py -c "import shutil, sys, pathlib; print(1 if shutil.which('py-spy') or (pathlib.Path(sys.executable).parent / 'py-spy').exists() else '')")

part() {
  case $1 in
    serve16)
      echo "=== served / offline, ViT-B/16 fp16, batch 64, 16-image requests of 224 px JPEGs (default layout with CUDA: frontends)"
      serve --client-processes 5 --concurrency 24 --images-per-request 16 --image-edge 224 \
        ${profile:+--gil-profile "$out/gil-16.txt"} 2>&1 | tee "$out/serve-vitb-16.txt"
      echo "=== the same, variant MaMe tau 0.85 (served and offline)"
      serve --client-processes 5 --concurrency 24 --images-per-request 16 --image-edge 224 --variant mame-0.85 \
        2>&1 | tee "$out/serve-vitb-16-mame.txt"
      echo "=== the same, the single layout (one process: HTTP, decoding, batching and the forward)"
      serve --client-processes 5 --concurrency 24 --images-per-request 16 --image-edge 224 --layout single \
        --preprocess-threads 10 2>&1 | tee "$out/serve-vitb-16-one-process.txt" ;;
    fe8)
      echo "=== served / offline, 16-image requests, 8 front-end processes"
      serve --client-processes 5 --concurrency 32 --images-per-request 16 --image-edge 224 --layout frontends \
        --http-processes 8 \
        2>&1 | tee "$out/serve-vitb-16-fe8.txt" ;;
    serve1)
      echo "=== served / offline, one bundled photo per request"
      serve --client-processes 6 --concurrency 192 2>&1 | tee "$out/serve-vitb-1.txt" ;;
    engine)
      echo "=== the engine alone at full batches, 1-image then 16-image requests"
      $py -m loadtest.engine --images-per-request 1 --concurrency 128 --seconds "${engine_s:-5}" 2>&1 \
        | tee "$out/engine-1.txt"
      $py -m loadtest.engine --images-per-request 16 --concurrency 8 --seconds "${engine_s:-5}" 2>&1 \
        | tee "$out/engine-16.txt" ;;
    latency)
      echo "=== latency added at concurrency 1"
      $py -m loadtest.serving latency --arch vit_base_patch16_224 --device cuda --dtype float16 --requests 30 \
        "${smoke_latency[@]}" 2>&1 | tee "$out/latency.txt" ;;
    memory)
      echo "=== memory (the default config; SMOKE=1: the sweep config)"
      $py -m loadtest.serving memory "${smoke_memory[@]}" 2>&1 | tee "$out/memory.txt" ;;
    bench)
      echo "=== mame-bench ViT-B/16, float16, batch 256 and 1024 (efficiency column, mixed case)"
      $py -m mame_core.bench --device cuda --batch-size 256,1024 --taus 1.0,0.9,0.85,0.8,0.7 --tome-r 8,13,16 \
        --rounds 5 --iters 10 --warmup 3 --no-progress --dtype float16 --json "$out/bench-float16.json" \
        "${smoke_bench[@]}" 2>&1 | tee "$out/bench-float16.txt"
      echo "=== mame-bench ViT-B/16, bfloat16, batch 256"
      $py -m mame_core.bench --device cuda --batch-size 256 --taus 1.0,0.9,0.85,0.8,0.7 --tome-r 8,13,16 \
        --rounds 5 --iters 10 --warmup 3 --no-progress --dtype bfloat16 --json "$out/bench-bfloat16.json" \
        "${smoke_bench[@]}" 2>&1 | tee "$out/bench-bfloat16.txt" ;;
    profile)
      echo "=== top CUDA kernels by time: timm, MaMe tau 0.85, ToMe r=13; ViT-B/16 float16 batch 256"
      $py -m mame_core.bench --device cuda --batch-size 256 --taus 0.85 --tome-r 13 --mixed-tau off \
        --rounds 1 --iters 3 --warmup 3 --no-progress --dtype float16 --profile --json "$out/profile.json" \
        "${smoke_bench[@]}" 2>&1 | tee "$out/profile.txt" ;;
    compile)
      echo "=== mame-bench ViT-B/16 float16 batch 256, each row eager and under torch.compile in the same rounds"
      $py -m mame_core.bench --device cuda --batch-size 256 --taus 1.0,0.85,0.8 --tome-r 13 --compile \
        --rounds 5 --iters 10 --warmup 3 --no-progress --dtype float16 --json "$out/bench-compile.json" \
        "${smoke_bench[@]}" 2>&1 | tee "$out/bench-compile.txt" ;;
    *) echo "unknown part $1 (serve16 fe8 serve1 engine latency memory bench profile compile)" >&2; return 2 ;;
  esac
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(serve16 fe8 serve1 engine latency memory bench profile)
status=0
for p in "${parts[@]}"; do
  start=$SECONDS
  part "$p" || status=1
  echo "--- part $p took $((SECONDS - start)) s"
done
exit $status
