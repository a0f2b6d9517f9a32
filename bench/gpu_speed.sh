#!/usr/bin/env bash
# Issue-10 GPU figures of docs/benchmarks.md on one GPU host (H100/H200) with ray, diffusers, xfuser
# and torchao importable (PYTHONPATH set). FLUX.1-dev-sized random weights, bf16, 1024^2, 28 steps.
#   bash bench/gpu_speed.sh service   # builds the checkpoint; compiled service vs compiled pipeline
#   bash bench/gpu_speed.sh knobs     # the speed knobs in-process: time and drift, side by side
#   bash bench/gpu_speed.sh fp8       # fp8 (compiled) through the service vs in-process
#   bash bench/gpu_speed.sh load      # the load harness: pipeline, naive server, ours (eager)
# Results (JSON) go to $OUT (default /tmp/bench-out).
set -euo pipefail
out=${OUT:-/tmp/bench-out}
model=/tmp/flux-dev-random
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$model/model_index.json" ] || python3 bench/make_random_flux.py --out "$model"
case "${1:?service, knobs, fp8 or load}" in
  service)
    python3 bench/bench_service.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --size 1024x1024 --steps 28 --solo 3 --requests 12 --concurrency 4 --no-unbatched \
      --denoiser '{"compile_blocks": true}' --out "$out/service-compiled.json"
    ;;
  knobs)
    python3 bench/bench_knobs.py --model-path "$model" --size 1024x1024 --steps 28 --repeats 3 \
      --sets "${SETS:-eager,compile,fp8+compile,first_block,fp8+first_block,compile+cuda_graphs,cudnn+compile}" \
      --out "$out/knobs.json"
    ;;
  fp8)
    python3 bench/bench_service.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --size 1024x1024 --steps 28 --solo 3 --requests 0 --no-unbatched \
      --denoiser '{"compile_blocks": true, "quantization": "fp8"}' \
      --out "$out/service-fp8.json"
    ;;
  load)
    python3 bench/load.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --workload bench/workloads/flux-1024.json --targets inprocess,naive,ours \
      --denoiser '{"compile_blocks": false}' --concurrency 2,4 --requests 8 --max-seconds 45 \
      --out "$out/load"
    ;;
esac
