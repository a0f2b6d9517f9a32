"""What step-level batching pays per step to send the plan to every rank (`WorkerGroup.rows_step`).

Step mode sends one Ray call per step to each rank of the worker group: the plan (joins, drops,
paused requests, previews) and back rank 0's report. This measures, on a real group:
  empty   a call that forwards nothing: the plan's round trip alone, per call;
  one     a row forwarded step by step, one call in flight: wall per call minus the time the rank
          spent inside it (`RowsReport.seconds`) = what a step costs beyond its forward;
  two     the same with two calls in flight, as the scheduler runs: (wall / calls) minus the mean
          forward = what the ranks still lose per step.

  python bench/bench_plan.py --size 256x256 --steps 40                    # configs/local.yaml, CPU
  python bench/bench_plan.py --ulysses 2 --size 256x256                   # SP=2 over gloo, CPU
  python bench/bench_plan.py --config configs/flux-1gpu.yaml --model-path /tmp/flux-dev-random \\
      --size 1024x1024 --steps 20 --rows 1,4 --denoiser '{"compile_blocks": false}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import csv  # noqa: E402
from bench.targets import read_config, replica_env  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--model-path", default=None)
    p.add_argument("--denoiser", default=None, help="JSON merged into the denoiser block")
    p.add_argument("--ulysses", type=int, default=None, help="override denoiser.ulysses_degree")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=csv(int), default=[1, 4])
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def make_inputs(config, rows: int, height: int, width: int, steps: int, seed: int):
    """Random FLUX embeddings shaped for the model (one request of `rows` images)."""
    import torch

    from deployments.families.base import DenoiseInputs
    from deployments.sampling import SamplingParams

    transformer = json.loads((Path(config.model.path) / "transformer" / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return DenoiseInputs(
        prompt_embeds=torch.randn(rows, config.model.max_sequence_length, transformer["joint_attention_dim"], generator=g),
        pooled_prompt_embeds=torch.randn(rows, transformer["pooled_projection_dim"], generator=g),
        sampling=SamplingParams(height, width, steps, 3.5, tuple(seed + i for i in range(rows))),
    )


async def empty_calls(group, count: int) -> list[float]:
    walls = []
    for _ in range(count):
        began = time.perf_counter()
        await group.rows_step([], [])
        walls.append(time.perf_counter() - began)
    return walls


async def _timed(sent: float, call):
    report = await call
    return time.perf_counter() - sent, report


async def row_calls(group, inputs, steps: int, in_flight: int, tag: str) -> dict:
    """Forward one request's rows to the end with `in_flight` calls outstanding."""
    pending, reports = [], []
    began = time.perf_counter()
    for i in range(steps):
        joins = [(tag, inputs)] if i == 0 else []
        pending.append((time.perf_counter(), group.rows_step(joins, [])))
        if len(pending) >= in_flight:
            reports.append(await _timed(*pending.pop(0)))
    for sent, call in pending:
        reports.append(await _timed(sent, call))
    wall = time.perf_counter() - began
    forward = [r.seconds for _, r in reports[1:]]  # the first call also prepares the row
    per_call = [w - r.seconds for w, r in reports[1:]]
    return {
        "calls": steps,
        "wall_per_step_s": wall / steps,
        "forward_median_s": statistics.median(forward),
        "beyond_forward_median_s": statistics.median(per_call) if in_flight == 1 else None,
        "lost_per_step_s": wall / steps - statistics.mean([r.seconds for _, r in reports]),
    }


async def measure(group, config, ns) -> dict:
    width, height = (int(v) for v in ns.size.lower().split("x"))
    figures = {"empty": None, "rows": {}}
    await empty_calls(group, 5)  # first calls warm Ray's paths
    walls = await empty_calls(group, 50)
    figures["empty"] = {"calls": len(walls), "median_s": statistics.median(walls), "p90_s": sorted(walls)[int(0.9 * len(walls))]}
    for rows in ns.rows:
        warm = make_inputs(config, rows, height, width, 3, seed=rows)
        await row_calls(group, warm, 3, 1, f"warm-{rows}")  # this row count's first forwards
        inputs = make_inputs(config, rows, height, width, ns.steps, seed=rows)
        figures["rows"][rows] = {
            "one_in_flight": await row_calls(group, inputs, ns.steps, 1, f"one-{rows}"),
            "two_in_flight": await row_calls(group, inputs, ns.steps, 2, f"two-{rows}"),
        }
    return figures


def main(argv=None) -> int:
    ns = parse_args(argv)
    import ray

    from deployments.sp_group import WorkerGroup
    from deployments.tiny.store import resolve_model_path
    from serve_app.config import AppConfig

    args, _ = read_config(ns.config, ns.model_path)
    args["model"]["path"] = resolve_model_path(args["model"]["path"])
    denoiser = args.setdefault("denoiser", {})
    denoiser.update(json.loads(ns.denoiser) if ns.denoiser else {})
    if ns.ulysses:
        denoiser["ulysses_degree"] = ns.ulysses
    config = AppConfig.model_validate(args)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": replica_env(ns.config)})
    group = WorkerGroup(config)
    try:
        group.start(timeout_s=900)
        figures = asyncio.run(measure(group, config, ns))
    finally:
        group.shutdown()
        ray.shutdown()
    figures["settings"] = {"config": ns.config, "size": ns.size, "steps": ns.steps,
                           "ranks": config.denoiser.world_size}
    text = json.dumps(figures, indent=2)
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
