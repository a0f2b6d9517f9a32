"""The denoiser's speed knobs side by side in one run: diffusers' FluxPipeline in-process with each
knob set applied to its transformer exactly as a denoiser worker applies it
(`deployments.families.flux.speed_up`), timed end to end (prompt -> PIL image), and the
drift of its final latents against the plain bf16 pipeline for the same prompt and seed.

  python bench/bench_knobs.py --model-path /tmp/flux-dev-random --size 1024x1024 --steps 28 \\
      --sets eager,compile,compile+cuda_graphs,fp8+compile,first_block --out knobs.json

Drift: relative L2 distance ||x - x_ref|| / ||x_ref|| of the packed latents, and the largest
absolute difference (random weights: the figures bound numeric drift, not image quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
KNOBS = {
    "eager": {},
    "compile": {"compile_blocks": True},
    "cuda_graphs": {"cuda_graphs": True},
    "fp8": {"quantization": "fp8"},
    "first_block": {"step_cache": {"kind": "first_block", "threshold": 0.08, "interval": 5}},
    "taylorseer": {"step_cache": {"kind": "taylorseer", "threshold": 0.05, "interval": 3}},
    "cudnn": {"attention_backend": "_native_cudnn"},
    "flash3": {"attention_backend": "_flash_3"},
}


def knob_set(name: str) -> dict:
    knobs: dict = {}
    for part in name.split("+"):
        knobs.update(KNOBS[part])
    if knobs.get("cuda_graphs"):
        knobs["compile_blocks"] = True
    return knobs


def measure(path: str, name: str, width: int, height: int, steps: int, repeats: int, reference):
    import torch
    from diffusers import FluxPipeline

    from deployments.families.base import LoadSpec
    from deployments.families.flux import speed_up

    pipe = FluxPipeline.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    spec = dataclasses.replace(LoadSpec(path=path, dtype="bfloat16", device="cuda"), **knob_set(name))
    started = time.perf_counter()
    speed_up(pipe.transformer, spec)

    def call(seed: int, output_type: str = "pil"):
        out = pipe(
            PROMPT,
            width=width,
            height=height,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
        ).images
        torch.cuda.synchronize()
        return out

    latents = call(0, "latent").float().cpu()  # also the warm-up (compiles)
    warmup_s = time.perf_counter() - started
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - start)
    row = {"set": name, "seconds": statistics.median(times), "all_seconds": times, "warmup_s": warmup_s}
    if reference is not None:
        row["drift_rel_l2"] = float((latents - reference).norm() / reference.norm())
        row["drift_max_abs"] = float((latents - reference).abs().max())
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row, latents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", default="eager,compile,fp8+compile,first_block")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    width, height = map(int, ns.size.split("x"))
    import torch

    rows, reference = [], None
    for name in ns.sets.split(","):
        try:
            row, latents = measure(ns.model_path, name, width, height, ns.steps, ns.repeats, reference)
        except Exception as exc:  # noqa: BLE001 - a knob this host cannot run is reported, not fatal
            row, latents = {"set": name, "error": f"{type(exc).__name__}: {exc}"[:300]}, None
            gc.collect()
            torch.cuda.empty_cache()
        if reference is None and latents is not None:
            reference = latents  # the first set (eager bf16) is the reference
        rows.append(row)
        print(json.dumps(row), flush=True)
        if ns.out:  # after every set, so a run cut short keeps what it measured
            Path(ns.out).write_text(
                json.dumps({"device": torch.cuda.get_device_name(), "size": ns.size, "steps": ns.steps, "rows": rows}, indent=2)
            )
    base = rows[0].get("seconds")
    print(f"\n{'set':32} {'s/image':>8} {'vs first':>8} {'drift L2':>9} {'warm-up s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['set']:32} error: {r['error']}")
            continue
        print(
            f"{r['set']:32} {r['seconds']:8.3f} {base / r['seconds']:7.2f}x"
            f" {r.get('drift_rel_l2', 0):9.4f} {r['warmup_s']:9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
