"""Sequence parallelism on GPUs, side by side in one run: SP=2 vs SP=1.

  denoise   The denoiser's worker group itself (what a Denoiser replica drives), FLUX.1-dev-sized,
            bf16, batch 1: a 1-step and a 28-step call per size; step time = (t28 - t1) / 27,
            so the figures are our code path (inputs through the object store, latents back to the
            CPU) with the per-call overheads taken out of the step time.
  service   The whole app over HTTP (configs/flux-2gpu-sp2.yaml, and the same file with
            ulysses_degree 1): latency of single requests at 1024^2, 28 steps.
  agree     How far each variant's latents are from the first's (SP=2, torch.compile: bf16 is
            not bit-exact), same inputs and seed.
  Variants: "1", "2" (SP degree), a "c" suffix compiles every transformer block.

  python bench/make_random_flux.py --out /tmp/flux-dev-random        # random weights, real config
  python bench/bench_sp.py denoise --model-path /tmp/flux-dev-random --sizes 1024 2048
  python bench/bench_sp.py denoise --model-path /tmp/flux-dev-random --sizes 1024 --compile
  python bench/bench_sp.py service --model-path /tmp/flux-dev-random --size 1024 --steps 28
  python bench/bench_sp.py service --model-path /tmp/flux-dev-random --variants 1 1c 2c
  python bench/bench_sp.py agree --model-path /tmp/flux-dev-random --variants 1 2 1c 2c --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import load_config, post  # noqa: E402


def group_args(model_path: str, degree: int, compile_blocks: bool, cpu: bool) -> dict:
    return {
        "model": {"name": "bench", "path": model_path, "dtype": "float32" if cpu else "bfloat16"},
        "denoiser": {
            "ulysses_degree": degree,
            "worker_num_gpus": 0 if cpu else 1,
            "worker_num_cpus": 1 if cpu else 0,
            "compile_blocks": compile_blocks,
            "warmup_sizes": [],
            "batching": {"max_batch_size": 4},
        },
        "vae_decoder": {"batching": {"max_batch_size": 4}},
        "limits": {"max_size": 2048},
        "defaults": {"size": "1024x1024", "num_inference_steps": 28},
    }


def dummy(model_path: str, size: int, steps: int):
    import torch

    from deployments.families.base import DenoiseInputs
    from deployments.sampling import SamplingParams

    config = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    return DenoiseInputs(
        prompt_embeds=torch.randn(1, 512, config["joint_attention_dim"], generator=g),
        pooled_prompt_embeds=torch.randn(1, config["pooled_projection_dim"], generator=g),
        sampling=SamplingParams(size, size, steps, 3.5, (0,)),
    )


def timed(group, x) -> float:
    import asyncio

    start = time.perf_counter()
    asyncio.run(group.run(x))
    return time.perf_counter() - start


def denoise(ns) -> dict:
    import ray

    from deployments.sp_group import WorkerGroup
    from serve_app.config import AppConfig

    ray.init(address="local", include_dashboard=False)
    figures: dict = {}
    for degree in ns.degrees:
        config = AppConfig.model_validate(group_args(ns.model_path, degree, ns.compile, ns.cpu))
        start = time.perf_counter()
        group = WorkerGroup(config)
        group.start(timeout_s=1800)
        print(f"SP={degree}: group up in {time.perf_counter() - start:.1f}s", flush=True)
        for size in ns.sizes:
            first = timed(group, dummy(ns.model_path, size, 1))  # warm-up: NCCL communicators, kernels, compile
            t1 = min(timed(group, dummy(ns.model_path, size, 1)) for _ in range(2))
            t28 = min(timed(group, dummy(ns.model_path, size, 28)) for _ in range(ns.reps))
            step = (t28 - t1) / 27
            figures[f"sp{degree}_{size}"] = {"first_call_s": first, "t1_s": t1, "t28_s": t28, "step_s": step}
            print(f"SP={degree} {size}^2: step {step:.4f}s, 28-step denoise {t28:.3f}s (first call {first:.1f}s)", flush=True)
        group.shutdown()
        time.sleep(5)  # let the GPUs be released
    for size in ns.sizes:
        a, b = figures.get(f"sp1_{size}"), figures.get(f"sp2_{size}")
        if a and b:
            print(f"{size}^2: SP=2 vs SP=1: {a['step_s'] / b['step_s']:.2f}x per step, {a['t28_s'] / b['t28_s']:.2f}x per 28-step denoise")
    ray.shutdown()
    return figures


def variants(ns) -> list[tuple[str, int, bool]]:
    """`--variants 1 2 2c`: (label, SP degree, torch.compile of the blocks)."""
    return [(v, int(v.rstrip("c")), v.endswith("c") or ns.compile) for v in ns.variants]


def service(ns) -> dict:
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    ray.init(address="local", include_dashboard=False)
    port = 8799
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    figures: dict = {}
    for label, degree, compiled in variants(ns):
        args, options = load_config(Path(ns.config), ns.model_path)
        args["denoiser"]["ulysses_degree"] = degree
        args["denoiser"]["compile_blocks"] = compiled
        start = time.perf_counter()
        serve.run(build_graph(AppConfig.model_validate(args), options), name="bench", route_prefix="/")
        print(f"SP={label}: app up in {time.perf_counter() - start:.1f}s", flush=True)
        post(url, 0, ns.size, ns.size, ns.steps)  # warm-up
        runs = [post(url, i + 1, ns.size, ns.size, ns.steps) for i in range(ns.requests)]
        latency = statistics.median(r[0] for r in runs)
        figures[f"sp{label}"] = {"latencies_s": [r[0] for r in runs], "median_s": latency}
        print(f"SP={label}: request latency {latency:.3f}s (median of {ns.requests}) {[round(r[0], 3) for r in runs]}", flush=True)
        serve.delete("bench")
        time.sleep(5)
    base = figures.get("sp1")
    for key, fig in figures.items():
        if base and key != "sp1":
            print(f"end to end {ns.size}^2 {ns.steps} steps: {key} vs sp1 {base['median_s'] / fig['median_s']:.2f}x")
    serve.shutdown()
    ray.shutdown()
    return figures


def agree(ns) -> dict:
    """How far each variant's latents are from SP=1 eager's (bf16: not bit-exact)."""
    import asyncio

    import ray

    from deployments.sp_group import WorkerGroup
    from serve_app.config import AppConfig

    ray.init(address="local", include_dashboard=False)
    x = dummy(ns.model_path, ns.size, ns.steps)
    latents, figures = {}, {}
    for label, degree, compiled in variants(ns):
        group = WorkerGroup(AppConfig.model_validate(group_args(ns.model_path, degree, compiled, ns.cpu)))
        group.start(timeout_s=1800)
        latents[label] = asyncio.run(group.run(x)).float()
        group.shutdown()
        time.sleep(5)
    ref = latents[ns.variants[0]]
    for label, lat in latents.items():
        diff = (lat - ref).abs()
        figures[label] = {
            "max_abs": diff.max().item(),
            "mean_abs": diff.mean().item(),
            "rel_l2": ((lat - ref).norm() / ref.norm()).item(),
        }
        print(f"{label} vs {ns.variants[0]}: {figures[label]}", flush=True)
    ray.shutdown()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["denoise", "service", "agree"])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["1", "2"], help="service/agree: 1 2 2c")
    parser.add_argument("--reps", type=int, default=2, help="28-step runs per size (min taken)")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--config", default=str(ROOT / "configs" / "flux-2gpu-sp2.yaml"), help="service")
    parser.add_argument("--cpu", action="store_true", help="smoke test: CPU workers, fp32 (denoise)")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    import torch

    figures = {"denoise": denoise, "service": service, "agree": agree}[ns.part](ns)
    figures["meta"] = {
        "part": ns.part,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "compile": ns.compile,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if ns.out:
        Path(ns.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
