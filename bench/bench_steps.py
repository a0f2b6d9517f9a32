"""What the denoiser's per-step contract costs, side by side in one run.

  whole   one call per rank runs every step in the worker (no stop checks): the old path
  loop    `run_group`, as a Denoiser replica runs a batch: one call per step to every rank, the
          job store's cancel flags read before each step, a `step` event per step written (SQLite)

Both run the same transformer on the same shapes, interleaved, batch 1; the figure is the median
over --reps of each, and the overhead per step = (loop - whole) / steps.

  python bench/bench_steps.py --cpu                                   # tiny model, CPU, SP=1
  python bench/bench_steps.py --cpu --degree 2                        # tiny model, SP=2 over gloo
  python bench/bench_steps.py --model-path /tmp/flux-dev-random --size 1024 --steps 28
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config_for(ns):
    from serve_app.config import AppConfig

    return AppConfig.model_validate(
        {
            "model": {"name": "bench", "path": ns.model_path, "dtype": "float32" if ns.cpu else "bfloat16"},
            "denoiser": {
                "ulysses_degree": ns.degree,
                "worker_num_gpus": 0 if ns.cpu else 1,
                "worker_num_cpus": 1 if ns.cpu else 0,
                "torch_threads": 1 if ns.cpu else None,
                "warmup_sizes": [],
            },
            "limits": {"max_size": 2048},
            "defaults": {"size": f"{ns.size}x{ns.size}", "num_inference_steps": ns.steps},
        }
    )


def item(ns, dims: tuple[int, int], job_id: str):
    import torch

    from deployments.denoise_loop import DenoiseItem
    from deployments.payloads import GenerationSpec, PromptEmbeddings
    from deployments.sampling import SamplingParams

    text_dim, pooled_dim = dims
    g = torch.Generator().manual_seed(0)
    spec = GenerationSpec(job_id, SamplingParams(ns.size, ns.size, ns.steps, 3.5, (0,)))
    return DenoiseItem(spec, PromptEmbeddings(job_id, torch.randn(1, 512, text_dim, generator=g), torch.randn(1, pooled_dim, generator=g)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="builtin:tiny-flux")
    parser.add_argument("--degree", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()

    import ray

    from deployments.denoise_loop import run_group
    from deployments.job_store import open_job_store
    from deployments.job_store.base import RUNNING, JobRecord
    from deployments.progress import StageProgress
    from deployments.sp_group import WorkerGroup
    from deployments.tiny.store import resolve_model_path

    ns.model_path = resolve_model_path(ns.model_path)
    transformer = json.loads((Path(ns.model_path) / "transformer" / "config.json").read_text())
    dims = (transformer["joint_attention_dim"], transformer["pooled_projection_dim"])
    ray.init(address="local", include_dashboard=False, num_cpus=8 if ns.cpu else None)
    group = WorkerGroup(config_for(ns))
    group.start(timeout_s=1800)
    store = open_job_store("sqlite", path=str(Path(tempfile.mkdtemp()) / "jobs.db"))

    def whole() -> float:
        start = time.perf_counter()
        ray.get([w.warmup.remote(1, ns.size, ns.size, ns.steps) for w in group._workers])
        return time.perf_counter() - start

    async def loop(rep: int) -> float:
        job_id = f"job-{rep}"
        store.create(JobRecord(job_id, "job", "bench", {}, status=RUNNING, lease_expires=1e12))
        progress = StageProgress(store, "denoiser")
        start = time.perf_counter()
        await run_group(group, [item(ns, dims, job_id)], progress)
        elapsed = time.perf_counter() - start
        await progress.flush()
        return elapsed

    whole(), asyncio.run(loop(-1))  # warm-up (kernels, communicators)
    times: dict[str, list[float]] = {"whole": [], "loop": []}
    for rep in range(ns.reps):
        times["whole"].append(whole())
        times["loop"].append(asyncio.run(loop(rep)))
    a, b = statistics.median(times["whole"]), statistics.median(times["loop"])
    per_step = (b - a) / ns.steps
    print(f"SP={ns.degree} {ns.size}^2 {ns.steps} steps: whole {a:.3f}s, per-step loop {b:.3f}s;"
          f" {per_step * 1000:.2f} ms per step ({per_step / (a / ns.steps) * 100:.1f}% of a step)")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"times": times, "per_step_overhead_s": per_step, "args": vars(ns)}, indent=2))
    group.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
