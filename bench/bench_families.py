"""SD3/SD3.5 and PixArt-Sigma: the Serve app vs the family's diffusers pipeline in-process, side by
side in one run (bench_service.py does the same for FLUX).

Measured for one config's model, at one size, steps and guidance (classifier-free guidance on, the
empty negative prompt, as both sides default to):
  1. in-process `StableDiffusion3Pipeline` / `PixArtSigmaPipeline.__call__`: request latency
     (median of --solo after a warm-up) and step time (median gap between the pipeline's
     per-step callbacks);
  2. the Serve app over HTTP, one request at a time: latency and the denoiser stage's time per
     step (its Server-Timing duration / steps, set-up included), and the worker's own step time
     (an async job's `step` events);
  3. with --throughput: images/s with --concurrency requests in flight, batching as configured
     and batching off (every max_batch_size 1), same load.
Replica counts are fixed at 1; API keys are dropped (the server listens on 127.0.0.1 only).

  python bench/make_random_families.py --out /tmp/random
  python bench/bench_families.py --config configs/sd35-medium-1gpu.yaml \\
      --model-path /tmp/random/sd35-medium --size 1024x1024 --steps 28
  python bench/bench_families.py --config configs/pixart-sigma-1gpu.yaml \\
      --model-path /tmp/random/pixart-sigma --size 512x512 --steps 20 --throughput
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

from bench.bench_service import PROMPTS, deploy, load_config, measure_service  # noqa: E402

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}


def in_process(family, path, dtype, device, width, height, steps, guidance, max_len, solo):
    import diffusers
    import torch

    from deployments.families.base import torch_dtype

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": max_len}
    if family == "pixart":
        extra.update(clean_caption=False, use_resolution_binning=False)
    stamps: list[float] = []

    def stamp() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def mark(pipe_, i, t, kwargs):
        stamp()
        return kwargs

    # PixArtSigmaPipeline has only the older per-step `callback`.
    if family == "pixart":
        extra.update(callback=lambda i, t, latents: stamp(), callback_steps=1)
    else:
        extra.update(callback_on_step_end=mark)

    def one(i: int) -> tuple[float, float]:
        stamps.clear()
        start = time.perf_counter()
        pipe(
            PROMPTS[i % len(PROMPTS)],
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(i),
            **extra,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return time.perf_counter() - start, statistics.median(gaps) if gaps else float("nan")

    one(0)  # warm-up
    runs = [one(i + 1) for i in range(solo)]
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def service_solo(url, width, height, steps, guidance, solo):
    import requests

    def one(i: int) -> tuple[float, float]:
        start = time.perf_counter()
        r = requests.post(
            f"{url}/v1/images/generations",
            json={
                "prompt": PROMPTS[i % len(PROMPTS)],
                "seed": i,
                "size": f"{width}x{height}",
                "num_inference_steps": steps,
                "guidance_scale": guidance,
            },
            timeout=1800,
        )
        assert r.status_code == 200, r.text
        latency = time.perf_counter() - start
        timing = dict(part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))
        return latency, float(timing["denoiser"]) / 1000 / steps

    one(0)  # warm-up
    runs = [one(i + 1) for i in range(solo)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def worker_step(url, width, height, steps, guidance) -> float:
    """Median `seconds` of an async job's `step` events: rank 0's own time per step, without the
    replica's calls around it."""
    import requests

    body = {"prompt": PROMPTS[0], "seed": 99, "size": f"{width}x{height}", "num_inference_steps": steps,
            "guidance_scale": guidance}
    job = requests.post(f"{url}/v1/images/jobs", json=body, timeout=60).json()
    seconds, event = [], None
    with requests.get(job["events_url"], stream=True, timeout=600) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "step":
                seconds.append(json.loads(line.split(":", 1)[1])["seconds"])
            elif line.startswith("data:") and event in ("completed", "failed", "cancelled"):
                break
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model-path", default=None, help="override model.path")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=None, help="default: the config's")
    parser.add_argument("--solo", type=int, default=3)
    parser.add_argument("--throughput", action="store_true", help="batched vs batching-off images/s")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    ns = parser.parse_args()
    width, height = map(int, ns.size.split("x"))
    args, options = load_config(Path(ns.config), ns.model_path)
    args.pop("auth", None)

    import ray
    import torch
    from ray import serve

    from deployments.families.specs import family_spec
    from deployments.tiny.store import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model_path(args["model"]["path"])
    args["model"]["path"] = path
    if ns.model_path:  # the folder says what it is
        from deployments.families.checkpoint import detect_family

        args["model"]["family"] = detect_family(path)
        args["model"].pop("max_sequence_length", None)
    family = args["model"]["family"]
    spec = family_spec(family)
    guidance = ns.guidance if ns.guidance is not None else args.get("defaults", {}).get(
        "guidance_scale", spec.default_guidance_scale
    )
    max_len = args["model"].get("max_sequence_length") or spec.default_max_sequence_length
    dtype = args["model"].get("dtype", "float32")
    figures = {
        "family": family,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "size": ns.size,
        "steps": ns.steps,
        "guidance": guidance,
        "date": time.strftime("%Y-%m-%d"),
    }
    lat, step = in_process(family, path, dtype, device, width, height, ns.steps, guidance, max_len, ns.solo)
    figures.update(in_process_s=lat, in_process_step_s=step)
    print(f"in-process: {lat:.3f} s/request, {step * 1000:.1f} ms/step", flush=True)

    ray.init(address="local", include_dashboard=False, **({} if device == "cuda" else {"num_cpus": 2}))
    port = 8799
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = deploy(args, options, port)
    slat, sstep = service_solo(url, width, height, ns.steps, guidance, ns.solo)
    try:
        wstep = worker_step(url, width, height, ns.steps, guidance)
    except Exception as exc:  # noqa: BLE001 - the other figures still stand
        print(f"worker step time unavailable: {exc!r}", flush=True)
        wstep = float("nan")
    figures.update(service_s=slat, service_step_s=sstep, service_worker_step_s=wstep)
    print(
        f"service: {slat:.3f} s/request, {sstep * 1000:.1f} ms/step (denoiser stage),"
        f" {wstep * 1000:.1f} ms/step (worker)",
        flush=True,
    )
    if ns.throughput:
        _, tput, batches = measure_service(url, width, height, ns.steps, 1, ns.requests, ns.concurrency)
        figures.update(batched_images_per_s=tput, batched_batches=batches)
        print(f"batched: {tput:.3f} images/s at concurrency {ns.concurrency}; {batches}", flush=True)
        for stage in ("text_encoder", "denoiser", "vae_decoder"):
            args.setdefault(stage, {}).setdefault("batching", {})["max_batch_size"] = 1
        args.setdefault("limits", {})["max_n"] = 1
        url = deploy(args, options, port)
        _, tput1, batches1 = measure_service(url, width, height, ns.steps, 1, ns.requests, ns.concurrency)
        figures.update(unbatched_images_per_s=tput1, unbatched_batches=batches1)
        print(f"batching off: {tput1:.3f} images/s; {batches1}", flush=True)
    serve.shutdown()
    ray.shutdown()
    print(f"\n{family} {ns.size} {ns.steps} steps, guidance {guidance}:")
    print(f"  request, service / in-process:  {slat / lat:.3f}x")
    print(f"  step, service / in-process:     {sstep / step:.3f}x")
    if ns.throughput:
        print(f"  images/s, batched / batching off: {tput / tput1:.2f}x")
    print(json.dumps(figures))
    if ns.out:
        Path(ns.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
