#!/usr/bin/env bash
# Issue-10 GPU figures of docs/benchmarks.md on one GPU host (H100/H200) with ray, diffusers, xfuser
# and torchao importable (PYTHONPATH set). FLUX.1-dev-sized random weights, bf16, 1024^2, 28 steps.
#   bash bench/gpu_speed.sh service   # builds the checkpoint; compiled service vs compiled pipeline
#   bash bench/gpu_speed.sh knobs     # the speed knobs in-process: time and drift, side by side
#   bash bench/gpu_speed.sh fp8       # fp8 (compiled) through the service vs in-process
#   bash bench/gpu_speed.sh load      # the load harness: pipeline, naive server, ours (eager)
#   bash bench/gpu_speed.sh modes512  # issue 12: step vs request batching, mixed 8/28 steps, 512^2
#   bash bench/gpu_speed.sh modes1024 # the same at 1024^2 (fewer requests: a point takes minutes); both
#                                     # modes take ~9 min: MODES=request, then MODES=step with
#                                     # CAPACITY_FROM=$OUT/modes-1024-request/report.json fit 10-min calls
#   bash bench/gpu_speed.sh plan      # issue 12: per-step cost of sending the plan to the rank
# Results (JSON) go to $OUT (default /tmp/bench-out).
set -euo pipefail
out=${OUT:-/tmp/bench-out}
model=/tmp/flux-dev-random
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$model/model_index.json" ] || python3 bench/make_random_flux.py --out "$model"
case "${1:?service, knobs, fp8, load, modes512, modes1024 or plan}" in
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
  modes512)
    python3 bench/bench_modes.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --workload bench/workloads/flux-mixed-512.json --denoiser '{"compile_blocks": false}' \
      --loads 0.5,0.8 --requests 24 --saturation 8 --solo 2 --repeats 1 --max-seconds 60 \
      --budget-s "${BUDGET_S:-400}" --out "$out/modes-512"
    ;;
  modes1024)
    python3 bench/bench_modes.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --workload bench/workloads/flux-mixed-1024.json --denoiser '{"compile_blocks": false}' \
      --loads 0.5,0.8 --requests 12 --saturation 8 --solo 2 --repeats 1 --max-seconds 100 \
      --modes "${MODES:-request,step}" ${CAPACITY_FROM:+--capacity-from "$CAPACITY_FROM"} \
      --budget-s "${BUDGET_S:-400}" --out "$out/modes-1024-${MODES:-request,step}"
    ;;
  plan)
    python3 bench/bench_plan.py --config configs/flux-1gpu.yaml --model-path "$model" \
      --size "${SIZE:-1024x1024}" --steps 12 --rows 1,4 --denoiser '{"compile_blocks": false}' \
      --out "$out/plan-${SIZE:-1024x1024}.json"
    ;;
esac
