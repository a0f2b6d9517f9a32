#!/usr/bin/env bash
# The SD3.5-medium and PixArt-Sigma figures of docs/benchmarks.md, on one GPU host (H100/H200) with
# ray, diffusers and xfuser importable (PYTHONPATH set). Random weights of the real configs.
#   bash bench/gpu_families.sh sd35     # builds both checkpoints, then SD3.5-medium at 1024^2
#   bash bench/gpu_families.sh pixart   # PixArt-Sigma at 1024^2, then 512^2 batched vs not
# Results (JSON) go to $OUT (default /tmp/bench-out).
set -euo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:?sd35 or pixart}" in
  sd35)
    python3 bench/make_random_families.py --out /tmp/random
    python3 bench/bench_families.py --config configs/sd35-medium-1gpu.yaml \
      --model-path /tmp/random/sd35-medium --size 1024x1024 --steps 28 --solo 3 --out "$out/sd35-1024.json"
    ;;
  pixart)
    python3 bench/bench_families.py --config configs/pixart-sigma-1gpu.yaml \
      --model-path /tmp/random/pixart-sigma --size 1024x1024 --steps 20 --solo 3 --out "$out/pixart-1024.json"
    python3 bench/bench_families.py --config configs/pixart-sigma-1gpu.yaml \
      --model-path /tmp/random/pixart-sigma --size 512x512 --steps 20 --solo 3 \
      --throughput --requests 32 --concurrency 8 --out "$out/pixart-512.json"
    ;;
esac
