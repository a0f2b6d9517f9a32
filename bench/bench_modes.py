"""Step-level vs request batching in the denoiser, side by side in one run (one Ray cluster).

The first mode's solo time per template (request mode by default) sets the capacity (1 / the
weighted mean solo latency); then each mode, interleaved (`--repeats` times, order alternating:
request, step, step, request, ...), is deployed, warmed up, and gets the same Poisson arrivals at
each `--loads` fraction of that capacity, then a closed loop at `--saturation` clients for
images/s. Prints the step / request ratios (p99 of the shortest requests, p50 of all, images/s at
saturation) and writes report.json. A run too long for one sitting can be split: `--modes` runs
one mode, `--capacity-from` reuses the first run's capacity, so the rates and arrivals match.

  python bench/bench_modes.py --workload bench/workloads/tiny-mixed-steps.json --loads 0.7 \\
      --requests 60 --repeats 2 --out bench/results/cpu-modes                 # configs/local.yaml
  python bench/bench_modes.py --config configs/flux-1gpu.yaml --model-path /tmp/flux-dev-random \\
      --workload bench/workloads/flux-mixed-512.json --denoiser '{"compile_blocks": false}' ...
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import csv, machine, setup  # noqa: E402
from bench.loadgen import (  # noqa: E402
    GpuSampler,
    _header,
    closed_loop,
    latency_stats,
    open_loop,
    parse_server_timing,
    summarize,
)
from bench.targets import RayCluster, ServeTarget, deployment_options, replica_env  # noqa: E402

MODES = ("request", "step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--model-path", default=None, help="override model.path")
    p.add_argument("--workload", default=str(ROOT / "bench" / "workloads" / "tiny-mixed-steps.json"))
    p.add_argument("--denoiser", default=None, help="JSON merged into the denoiser block of both modes")
    p.add_argument("--loads", type=csv(float), default=[0.7], help="open-loop rates, fractions of capacity")
    p.add_argument("--requests", type=int, default=40, help="requests per open-loop point")
    p.add_argument("--saturation", type=int, default=16, help="closed-loop clients for images/s (0: none)")
    p.add_argument("--saturation-requests", type=int, default=None, help="default: --requests")
    p.add_argument("--solo", type=int, default=3, help="sequential requests per template for capacity")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode, interleaved")
    p.add_argument("--max-seconds", type=float, default=120, help="no request starts later in a point")
    p.add_argument("--budget-s", type=float, default=None, help="start no mode run after this many seconds")
    p.add_argument("--timeout", type=float, default=300, help="client timeout per request (s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--modes", type=csv(str), default=list(MODES),
                   help="the modes to run, in the first repeat's order (later repeats alternate)")
    p.add_argument("--capacity-from", default=None,
                   help="an earlier report.json of the same workload and config: its capacity (and so the"
                   " same rates) instead of measuring solo times; for runs split over several invocations")
    p.add_argument("--out", default=None, help="output folder (default bench/results/modes-<date-time>)")
    ns = p.parse_args(argv)
    if ns.requests < 1 or ns.repeats < 1 or ns.solo < 1 or ns.saturation < 0:
        p.error("--requests, --repeats and --solo must be >= 1, --saturation >= 0")
    if not ns.loads or min(ns.loads) <= 0:
        p.error("--loads must be fractions > 0")
    if not ns.modes or set(ns.modes) - set(MODES) or len(set(ns.modes)) < len(ns.modes):
        p.error(f"--modes: one or both of {','.join(MODES)}")
    return ns


def mode_args(args: dict, mode: str) -> dict:
    args = copy.deepcopy(args)
    args.setdefault("denoiser", {}).setdefault("batching", {})["mode"] = mode
    return args


def solo_capacity(target, templates: list[dict], solo: int, timeout: float) -> dict:
    """Median latency of `solo` sequential requests per template, alone; capacity = 1 / the
    weighted mean (requests/s one replica serves one at a time). `fixed_s`: the part of a solo
    request outside the denoiser (HTTP, text encoder, VAE, encoding), which no batching mode changes."""
    per_template = []
    for i, template in enumerate(templates):
        body = {k: v for k, v in template.items() if k != "weight"}
        times, denoiser = [], []
        for j in range(solo):
            began = time.perf_counter()
            outcome = target.send({**body, "prompt": "capacity", "seed": 1000 * i + j}, timeout)
            if outcome.status != 200:
                raise RuntimeError(f"solo request {body} answered {outcome.status}: {outcome.error}")
            times.append(time.perf_counter() - began)
            denoiser.append(parse_server_timing(_header(outcome.headers, "Server-Timing")).get("denoiser", 0.0))
        median, denoise = statistics.median(times), statistics.median(denoiser)
        per_template.append({"template": body, "weight": template.get("weight", 1.0), "median_s": median,
                             "denoiser_s": denoise, "fixed_s": median - denoise})
    total = sum(t["weight"] for t in per_template)
    mean = sum(t["weight"] * t["median_s"] for t in per_template) / total
    return {"templates": per_template, "mean_solo_s": mean, "capacity_per_s": 1.0 / mean}


def beyond_fixed(records, bodies: list[dict], capacity: dict) -> dict:
    """Latency figures of the 200s less the solo fixed cost of their kind (same step count)."""
    fixed = {t["template"].get("num_inference_steps"): t["fixed_s"] for t in capacity["templates"]}
    return latency_stats([r.latency - fixed.get(bodies[r.index].get("num_inference_steps"), 0.0)
                          for r in records if r.outcome.status == 200])


def run_mode(target, bodies: list[dict], rates: list[float], capacity: dict, ns: argparse.Namespace) -> dict:
    points = {"open": [], "closed": None}
    for load, rate in zip(ns.loads, rates):
        with GpuSampler() as gpu:
            records, wall = open_loop(target.send, bodies, rate, ns.seed, ns.max_seconds, ns.timeout)
        points["open"].append({"load": load, "rate": rate, **summarize(records, wall, len(bodies), bodies),
                               "latency_beyond_fixed_s": beyond_fixed(records, bodies, capacity),
                               "gpu_util_mean": gpu.mean})
        print(f"  {target.name}: open {load:g} ({rate:.3f}/s) done in {wall:.1f} s", flush=True)
    if ns.saturation:
        sat = bodies[: ns.saturation_requests or len(bodies)]
        with GpuSampler() as gpu:
            records, wall = closed_loop(target.send, sat, ns.saturation, ns.max_seconds, ns.timeout)
        points["closed"] = {"concurrency": ns.saturation, **summarize(records, wall, len(sat), sat), "gpu_util_mean": gpu.mean}
        print(f"  {target.name}: closed c={ns.saturation} done in {wall:.1f} s", flush=True)
    return points


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(runs: list[dict], loads: list[float]) -> dict:
    """Step / request ratios of the per-mode means over repeats."""
    by_mode = {m: [r for r in runs if r["mode"] == m and "error" not in r] for m in MODES}
    out = {"open": [], "saturation": None}
    for i, load in enumerate(loads):
        fig = {}
        for m in MODES:
            pts = [r["points"]["open"][i] for r in by_mode[m] if len(r["points"]["open"]) > i]
            shortest = [min(p["latency_by_steps_s"].items(), key=lambda kv: int(kv[0])) for p in pts if p["latency_by_steps_s"]]
            fig[m] = {
                "runs": len(pts),
                "p50_all_s": _mean([p["latency_s"]["p50"] for p in pts]),
                "p99_all_s": _mean([p["latency_s"]["p99"] for p in pts]),
                "p50_all_beyond_fixed_s": _mean([p["latency_beyond_fixed_s"]["p50"] for p in pts]),
                "shortest_steps": shortest[0][0] if shortest else None,
                "p99_shortest_s": _mean([s["p99"] for _, s in shortest]),
                "p50_shortest_s": _mean([s["p50"] for _, s in shortest]),
                "failed": sum(p["failed"] for p in pts),
            }
        out["open"].append({
            "load": load, **fig,
            "p99_shortest_step_over_request": _ratio(fig["step"]["p99_shortest_s"], fig["request"]["p99_shortest_s"]),
            "p50_all_step_over_request": _ratio(fig["step"]["p50_all_s"], fig["request"]["p50_all_s"]),
            "p50_beyond_fixed_step_over_request": _ratio(fig["step"]["p50_all_beyond_fixed_s"],
                                                         fig["request"]["p50_all_beyond_fixed_s"]),
        })
    sat = {m: _mean([r["points"]["closed"]["images_per_s"] for r in by_mode[m] if r["points"].get("closed")]) for m in MODES}
    if any(v is not None for v in sat.values()):
        out["saturation"] = {"images_per_s": sat, "step_over_request": _ratio(sat["step"], sat["request"])}
    return out


def table(comparison: dict) -> str:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = ["| load | p99 shortest step / request (s) | ratio | p50 all step / request (s) | ratio"
             " | p50 beyond fixed costs, ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in comparison["open"]:
        s, r = row["step"], row["request"]
        lines.append(
            f"| {row['load']:g} | {f(s['p99_shortest_s'])} / {f(r['p99_shortest_s'])} ({s['shortest_steps']} steps)"
            f" | {f(row['p99_shortest_step_over_request'])}x | {f(s['p50_all_s'])} / {f(r['p50_all_s'])}"
            f" | {f(row['p50_all_step_over_request'])}x | {f(row['p50_beyond_fixed_step_over_request'])}x |"
        )
    sat = comparison["saturation"]
    if sat:
        lines.append(f"\nimages/s at saturation, step / request: {f(sat['images_per_s']['step'])} / "
                     f"{f(sat['images_per_s']['request'])} = {f(sat['step_over_request'])}x")
    return "\n".join(lines)


def run_modes(report: dict, args: dict, options: dict, cluster, templates: list[dict], bodies: list[dict],
              ns: argparse.Namespace, out: Path, begin: float, route_prefix: str = "/") -> None:
    """Each mode `ns.repeats` times, interleaved, into report["runs"] (the capacity from the first
    run's solo times); report.json is rewritten after every run, so a cut-short run keeps its figures."""
    rates: list[float] = []
    for repeat in range(ns.repeats):
        for mode in (ns.modes if repeat % 2 == 0 else ns.modes[::-1]):
            if ns.budget_s and time.perf_counter() - begin > ns.budget_s:
                print(f"== {mode} #{repeat + 1}: skipped, past --budget-s", flush=True)
                continue
            print(f"== {mode} #{repeat + 1}", flush=True)
            target = ServeTarget(f"ours-{mode}", mode_args(args, mode), options, cluster, route_prefix=route_prefix)
            run = {"mode": mode, "repeat": repeat}
            try:
                started = time.perf_counter()
                target.start()
                run["start_s"] = time.perf_counter() - started
                for template in templates:  # every step count once, before anything is timed
                    body = {k: v for k, v in template.items() if k != "weight"}
                    target.send({**body, "prompt": "warm-up", "seed": 999_999}, ns.timeout)
                if report["capacity"] is None:
                    report["capacity"] = {"mode": mode, **solo_capacity(target, templates, ns.solo, ns.timeout)}
                    print(f"  capacity {report['capacity']['capacity_per_s']:.3f}/s "
                          f"(mean solo {report['capacity']['mean_solo_s']:.2f} s)", flush=True)
                rates = [load * report["capacity"]["capacity_per_s"] for load in ns.loads]
                run["points"] = run_mode(target, bodies, rates, report["capacity"], ns)
            except Exception as exc:  # a failed run is recorded; the other mode still runs
                traceback.print_exc()
                run["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                target.stop()
            report["runs"].append(run)
            report["comparison"] = compare(report["runs"], ns.loads)
            (out / "report.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    ns = parse_args(argv)
    begin = time.perf_counter()
    args, deployments, templates, bodies, device, out = setup(ns, "modes-")
    report = {
        "machine": machine(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "config": {"path": str(ns.config), "args": args},
        "workload": {"path": str(ns.workload), "templates": templates, "seed": ns.seed},
        "settings": {k: getattr(ns, k) for k in ("loads", "requests", "saturation", "solo", "repeats", "max_seconds")},
        "capacity": json.loads(Path(ns.capacity_from).read_text())["capacity"] if ns.capacity_from else None,
        "runs": [],
    }
    cluster = RayCluster(device, replica_env(ns.config))
    try:
        run_modes(report, args, deployment_options(deployments, False), cluster, templates, bodies, ns, out, begin)
    finally:
        cluster.shutdown()
    report["seconds"] = time.perf_counter() - begin
    report["comparison"] = compare(report["runs"], ns.loads)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(report["comparison"]) + f"\n\nwrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
