"""End-to-end benchmark, side by side in one run: the Serve app vs diffusers in-process.

Measured, for the same model, prompts, size and steps:
  1. in-process `FluxPipeline.__call__`, one request at a time (what a hand-made Flask/FastAPI
     wrapper with a lock does): latency per image and images/s;
  2. the Serve app over HTTP: latency of a request alone, and images/s with C requests in flight
     (stages batch and overlap);
  3. optionally the same app with every stage's max_batch_size=1 (batching off), same load.
Ratios are printed at the end. Replica counts are fixed at 1 (the config's autoscaling is dropped)
so the figures measure batching and pipelining, not extra replicas.

  python bench/bench_service.py                                  # tiny model, configs/local.yaml
  python bench/bench_service.py --config configs/flux-1gpu.yaml \\
      --model-path /tmp/flux-dev-random --size 1024x1024 --steps 28 \\
      --requests 8 --concurrency 4 --solo 3 --no-unbatched        # GPU, see make_random_flux.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "a lighthouse on a cliff at sunset, oil painting",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table, still life",
    "a red fox in the snow, photograph",
    "a city street at night with neon signs",
    "a dragon flying over a castle, fantasy art",
    "a sailing ship in a storm, dramatic lighting",
    "a field of sunflowers under a blue sky",
]


def load_config(path: Path, model_path: str | None):
    app = yaml.safe_load(path.read_text())["applications"][0]
    args = app["args"]
    args.pop("auth", None)  # the benchmark's client sends no key
    if model_path:
        args["model"]["path"] = model_path
        args["model"]["name"] = "bench-model"
    options = {}
    for d in app.get("deployments", []):
        opts = {k: v for k, v in d.items() if k not in ("name", "autoscaling_config")}
        options[d["name"]] = {**opts, "num_replicas": 1}
    return args, options


def in_process(model_path: str, dtype: str, device: str, width: int, height: int, steps: int, solo: int, args=None):
    import torch
    from diffusers import FluxPipeline

    from deployments.families.base import torch_dtype
    from deployments.families.flux import speed_up
    from deployments.runtime import load_spec
    from serve_app.config import AppConfig

    pipe = FluxPipeline.from_pretrained(model_path, dtype=torch_dtype(dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args is not None:  # the denoiser's speed knobs, on the pipeline's transformer as a worker sets them
        speed_up(pipe.transformer, load_spec(AppConfig.model_validate(args), device, denoiser=True))

    def one(i: int) -> float:
        start = time.perf_counter()
        pipe(
            PROMPTS[i % len(PROMPTS)],
            width=width,
            height=height,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(i),
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one(0)  # warm-up
    latencies = [one(i + 1) for i in range(solo)]
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(latencies)


def post(url: str, i: int, width: int, height: int, steps: int) -> tuple[float, int, str]:
    import requests

    start = time.perf_counter()
    r = requests.post(
        f"{url}/v1/images/generations",
        json={
            "prompt": PROMPTS[i % len(PROMPTS)],
            "seed": i,
            "size": f"{width}x{height}",
            "num_inference_steps": steps,
        },
        timeout=1800,
    )
    assert r.status_code == 200, r.text
    return time.perf_counter() - start, len(r.json()["data"]), r.headers.get("x-dit-batch-sizes", "")


def measure_service(url, width, height, steps, solo, requests_n, concurrency):
    post(url, 0, width, height, steps)  # warm-up
    solo_lat = statistics.median(post(url, i + 1, width, height, steps)[0] for i in range(solo))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: post(url, 100 + i, width, height, steps), range(requests_n)))
    wall = time.perf_counter() - start
    images = sum(r[1] for r in results)
    batches = sorted({r[2] for r in results})
    return solo_lat, images / wall, batches


def deploy(args, options, port):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    serve.run(build_graph(AppConfig.model_validate(args), options), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    parser.add_argument("--model-path", default=None, help="override model.path")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--solo", type=int, default=5, help="sequential requests for latency")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-unbatched", action="store_true", help="skip the batching-off run")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--denoiser",
        default=None,
        help='JSON merged into the config\'s denoiser block and applied to the in-process pipeline'
        ' too, e.g. \'{"compile_blocks": true, "quantization": "fp8"}\'',
    )
    ns = parser.parse_args()
    width, height = map(int, ns.size.split("x"))
    args, options = load_config(Path(ns.config), ns.model_path)
    knobs = json.loads(ns.denoiser) if ns.denoiser else {}
    args.setdefault("denoiser", {}).update(knobs)

    import ray
    import torch
    from ray import serve

    from deployments.tiny.store import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_path = resolve_model_path(args["model"]["path"])
    args["model"]["path"] = model_path
    dtype = args["model"].get("dtype", "float32")
    if device == "cpu":
        torch.set_num_threads(2)
    base_lat = in_process(model_path, dtype, device, width, height, ns.steps, ns.solo, args)
    print(f"in-process: {base_lat:.3f} s/image, {1 / base_lat:.3f} images/s", flush=True)

    cpus = {} if device == "cuda" else {"num_cpus": 2}
    from bench.targets import replica_env  # here: bench.targets imports this module's PROMPTS

    env = {"env_vars": replica_env(ns.config)}
    ray.init(address="local", include_dashboard=False, runtime_env=env, **cpus)
    port = 8799
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "size": ns.size,
        "steps": ns.steps,
        "concurrency": ns.concurrency,
        "requests": ns.requests,
        "in_process_s_per_image": base_lat,
        "denoiser": knobs,
    }
    url = deploy(args, options, port)
    solo, tput, batches = measure_service(url, width, height, ns.steps, ns.solo, ns.requests, ns.concurrency)
    figures.update(service_solo_s=solo, service_images_per_s=tput, service_batches=batches)
    print(f"service: solo {solo:.3f} s, {tput:.3f} images/s at concurrency {ns.concurrency}; batches {batches}", flush=True)
    if not ns.no_unbatched:
        for stage in ("text_encoder", "denoiser", "vae_decoder"):
            args.setdefault(stage, {}).setdefault("batching", {})["max_batch_size"] = 1
        args.setdefault("limits", {})["max_n"] = 1
        url = deploy(args, options, port)
        _, tput1, batches1 = measure_service(url, width, height, ns.steps, 1, ns.requests, ns.concurrency)
        figures.update(unbatched_images_per_s=tput1, unbatched_batches=batches1)
        print(f"service, batching off: {tput1:.3f} images/s; batches {batches1}", flush=True)
    serve.shutdown()
    ray.shutdown()

    print("\nratios (higher is better for ours):")
    print(f"  throughput, service / in-process:    {tput * base_lat:.2f}x")
    print(f"  solo latency, in-process / service:  {base_lat / solo:.2f}x")
    if "unbatched_images_per_s" in figures:
        print(f"  throughput, batched / batching off:  {tput / figures['unbatched_images_per_s']:.2f}x")
    if ns.out:
        Path(ns.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
