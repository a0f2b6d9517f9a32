"""Load harness: four targets, closed- and open-loop load, one command, ratios from one run.

Targets, run one after another (never two at once, so they do not compete for the machine):
  inprocess       diffusers FluxPipeline.__call__ in this process, one request at a time (a lock)
  naive           bench/naive_server.py (FastAPI + one pipeline behind a lock), a subprocess
  ours-unbatched  the Serve app with every stage's max_batch_size=1 and limits.max_n=1
  ours            the Serve app as configured (replicas fixed at 1 unless --autoscale)
For each: one warm-up request, then closed loop at each --concurrency and open loop (Poisson
arrivals) at each --rates, the same seeded request sequence everywhere. Writes <out>/report.json,
<out>/latency_vs_load.png and <out>/throughput_vs_concurrency.png, and prints a table.

  python bench/load.py --workload bench/workloads/tiny.json --concurrency 1,2,4,8 --rates 0.5,1,2 \\
      --requests 24 --max-seconds 120 --out bench/results/cpu-tiny            # configs/local.yaml
  python bench/load.py --config configs/flux-1gpu.yaml --model-path /tmp/flux-dev-random \\
      --workload bench/workloads/flux-1024.json --out bench/results/h100       # see docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report as reporting  # noqa: E402
from bench.loadgen import GpuSampler, closed_loop, draw_requests, load_workload, open_loop, summarize  # noqa: E402
from bench.targets import RayCluster, make_target, read_config, replica_env  # noqa: E402

TARGETS = ("inprocess", "naive", "ours-unbatched", "ours")


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--model-path", default=None, help="override model.path")
    p.add_argument("--workload", default=str(ROOT / "bench" / "workloads" / "tiny.json"))
    p.add_argument("--targets", type=csv(str), default=list(TARGETS), help="comma-separated, run in this order")
    p.add_argument("--concurrency", type=csv(int), default=[1, 2, 4, 8], help="closed-loop clients per point")
    p.add_argument("--rates", type=csv(float), default=[0.5, 1, 2], help="open-loop arrivals/s per point")
    p.add_argument("--requests", type=int, default=24, help="requests per load point")
    p.add_argument("--max-seconds", type=float, default=120, help="no request starts later in a point")
    p.add_argument("--timeout", type=float, default=300, help="client timeout per request (s)")
    p.add_argument("--seed", type=int, default=0, help="request draw and arrival schedule")
    p.add_argument("--autoscale", action="store_true", help="ours keeps the config's autoscaling_config")
    p.add_argument(
        "--denoiser",
        default=None,
        help='JSON merged into the config\'s denoiser block for ours (the baselines run the plain'
        ' pipeline: keep it like for like, e.g. \'{"compile_blocks": false}\')',
    )
    p.add_argument("--out", default=None, help="output folder (default bench/results/<date-time>)")
    ns = p.parse_args(argv)
    if ns.requests < 1 or min(ns.concurrency, default=1) < 1:
        p.error("--requests and every --concurrency must be >= 1")
    if ns.max_seconds <= 0 or ns.timeout <= 0 or min(ns.rates, default=1) <= 0:
        p.error("--max-seconds, --timeout and every --rates must be > 0")
    unknown = [t for t in ns.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {','.join(TARGETS)}")
    return ns


def machine(device: str) -> dict:
    import torch

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_points(target, bodies: list[dict], ns: argparse.Namespace) -> dict:
    """Warm-up, then every closed- and open-loop point of one (started) target."""
    warm = target.send({**bodies[0], "seed": 999_999}, ns.timeout)
    result = {"warmup": {"status": warm.status, "error": warm.error}, "closed": [], "open": []}
    for c in ns.concurrency:
        with GpuSampler() as gpu:
            records, wall = closed_loop(target.send, bodies, c, ns.max_seconds, ns.timeout)
        result["closed"].append({"concurrency": c, **summarize(records, wall, len(bodies), bodies), "gpu_util_mean": gpu.mean})
        print(f"  {target.name}: closed c={c} done in {wall:.1f} s", flush=True)
    for rate in ns.rates:
        with GpuSampler() as gpu:
            records, wall = open_loop(target.send, bodies, rate, ns.seed, ns.max_seconds, ns.timeout)
        result["open"].append({"rate": rate, **summarize(records, wall, len(bodies), bodies), "gpu_util_mean": gpu.mean})
        print(f"  {target.name}: open {rate:g}/s done in {wall:.1f} s", flush=True)
    return result


def run_target(target, bodies: list[dict], ns: argparse.Namespace) -> dict:
    print(f"== {target.name}", flush=True)
    begin = time.perf_counter()
    try:
        target.start()
        result = run_points(target, bodies, ns)
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}", "closed": [], "open": []}
    finally:
        target.stop()
    result["seconds"] = time.perf_counter() - begin
    return result


def setup(ns: argparse.Namespace, out_prefix: str = ""):
    """What a run of the harness starts from (this one's or bench_modes.py's): the config's args
    (model path resolved, `--denoiser` merged), its deployments, the workload templates, the seeded
    request bodies, the device, and the output folder (made)."""
    import torch

    from deployments.tiny.store import resolve_model_path

    args, deployments = read_config(ns.config, ns.model_path)
    args["model"]["path"] = resolve_model_path(args["model"]["path"])
    if ns.denoiser:
        args.setdefault("denoiser", {}).update(json.loads(ns.denoiser))
    templates = load_workload(ns.workload)
    bodies = draw_requests(templates, ns.requests, ns.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stamp = datetime.datetime.now().strftime(f"{out_prefix}%Y%m%d-%H%M%S")
    out = Path(ns.out or ROOT / "bench" / "results" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    return args, deployments, templates, bodies, device, out


def main(argv=None) -> int:
    ns = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args, deployments, templates, bodies, device, out = setup(ns)

    meta = {
        "machine": machine(device),
        "date": started,
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "config": {"path": str(ns.config), "args": args, "deployments": deployments, "autoscale": ns.autoscale},
        "workload": {"path": str(ns.workload), "templates": templates, "seed": ns.seed},
        "settings": {k: getattr(ns, k) for k in ("targets", "concurrency", "rates", "requests", "max_seconds", "timeout")},
    }
    cluster = RayCluster(device, replica_env(ns.config))
    targets: dict[str, dict] = {}
    try:
        for name in ns.targets:
            target = make_target(name, args=args, deployments=deployments, device=device, cluster=cluster,
                                 out=out, autoscale=ns.autoscale)
            targets[name] = run_target(target, bodies, ns)
            reporting.write_json(out, reporting.build_report(meta, targets))  # a cut-short run keeps it
    finally:
        cluster.shutdown()

    report = reporting.build_report(meta, targets)
    path = reporting.write_json(out, report)
    plots = reporting.plot(out, targets)
    print("\n" + reporting.table(targets) + "\n\n" + reporting.ratios_text(report["ratios"]))
    print(f"\nwrote {path}, {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
