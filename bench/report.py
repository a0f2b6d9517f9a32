"""bench/load.py's outputs: report.json (with the ratios of this run), two PNG plots, a table."""

from __future__ import annotations

import json
from pathlib import Path

LATENCY_PLOT = "latency_vs_load.png"
THROUGHPUT_PLOT = "throughput_vs_concurrency.png"


def _div(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _closed(targets: dict, name: str) -> dict:
    """{concurrency: point} of one target's closed-loop points ({} if it did not run)."""
    return {p["concurrency"]: p for p in targets.get(name, {}).get("closed", [])}


def _p50(point):
    return point["latency_s"]["p50"] if point else None


def _ips(point):
    return point["images_per_s"] if point else None


def compute_ratios(targets: dict) -> dict:
    """Ours against each baseline, from this run's closed-loop points (None where one is missing)."""
    ours, inproc = _closed(targets, "ours"), _closed(targets, "inprocess")
    naive, unbatched = _closed(targets, "naive"), _closed(targets, "ours-unbatched")
    common = sorted(set(ours) & set(inproc))
    top = common[-1] if common else None
    return {
        "throughput_ours_over_inprocess_at_max_concurrency": {
            "concurrency": top,
            "ratio": _div(_ips(ours.get(top)), _ips(inproc.get(top))),
        },
        "ours_vs_naive": {
            str(c): {
                "p50_ours_over_naive": _div(_p50(ours[c]), _p50(naive[c])),
                "images_per_s_ours_over_naive": _div(_ips(ours[c]), _ips(naive[c])),
            }
            for c in sorted(set(ours) & set(naive))
        },
        "images_per_s_ours_over_unbatched": {
            str(c): _div(_ips(ours[c]), _ips(unbatched[c])) for c in sorted(set(ours) & set(unbatched))
        },
        "solo_latency_ours_over_inprocess": _div(_p50(ours.get(1)), _p50(inproc.get(1))),
    }


def build_report(meta: dict, targets: dict) -> dict:
    return {**meta, "targets": targets, "ratios": compute_ratios(targets)}


def write_json(out: Path, report: dict) -> Path:
    path = Path(out) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    return path


def _series(points: list[dict], x_key: str, y):
    pts = sorted((p[x_key], y(p)) for p in points if y(p) is not None)
    return [x for x, _ in pts], [v for _, v in pts]


def plot(out: Path, targets: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, t) in enumerate(targets.items()):
        color = f"C{i}"
        for q, style in (("p50", "-o"), ("p99", "--x")):
            xs, ys = _series(t.get("open", []), "rate", lambda p, q=q: p["latency_s"][q])
            if xs:
                ax.plot(xs, ys, style, color=color, label=f"{name} {q}")
    ax.set(xlabel="offered load (requests/s, Poisson)", ylabel="latency (s)", title="Latency vs offered load")
    _finish(fig, ax, out / LATENCY_PLOT)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks = set()
    for i, (name, t) in enumerate(targets.items()):
        xs, ys = _series(t.get("closed", []), "concurrency", lambda p: p["images_per_s"])
        if xs:
            ax.plot(xs, ys, "-o", color=f"C{i}", label=name)
            ticks.update(xs)
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(c) for c in sorted(ticks)])
    ax.set(xlabel="concurrency (closed loop)", ylabel="images/s", title="Throughput vs concurrency")
    _finish(fig, ax, out / THROUGHPUT_PLOT)
    return [out / LATENCY_PLOT, out / THROUGHPUT_PLOT]


def _finish(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(targets: dict) -> str:
    head = f"{'target':<15} {'mode':<6} {'load':>6} {'sent':>5} {'ok':>4} {'fail':>4} " \
           f"{'p50_s':>7} {'p95_s':>7} {'p99_s':>7} {'mean_s':>7} {'img/s':>7} {'req/s':>7} {'gpu%':>5}"
    lines = [head, "-" * len(head)]
    for name, t in targets.items():
        if t.get("error"):
            lines.append(f"{name:<15} error: {t['error']}")
        for mode, key in (("closed", "concurrency"), ("open", "rate")):
            for p in t.get(mode, []):
                lat = p["latency_s"]
                load = f"c={p[key]}" if mode == "closed" else f"{p[key]:g}/s"
                lines.append(
                    f"{name:<15} {mode:<6} {load:>6} {p['sent']:>5} {p['ok']:>4} {p['failed']:>4} "
                    f"{_fmt(lat['p50']):>7} {_fmt(lat['p95']):>7} {_fmt(lat['p99']):>7} {_fmt(lat['mean']):>7} "
                    f"{_fmt(p['images_per_s'], '.2f'):>7} {_fmt(p['requests_per_s'], '.2f'):>7} "
                    f"{_fmt(p.get('gpu_util_mean'), '.0f'):>5}"
                )
    return "\n".join(lines)


def ratios_text(ratios: dict) -> str:
    top = ratios["throughput_ours_over_inprocess_at_max_concurrency"]
    lines = ["ratios (ours / baseline):",
             f"  images/s ours / inprocess at c={top['concurrency']}: {_fmt(top['ratio'], '.2f')}x",
             f"  solo p50 latency ours / inprocess (c=1): {_fmt(ratios['solo_latency_ours_over_inprocess'], '.2f')}x"]
    for c, r in ratios["ours_vs_naive"].items():
        lines.append(f"  c={c}: p50 ours / naive {_fmt(r['p50_ours_over_naive'], '.2f')}x, "
                     f"images/s ours / naive {_fmt(r['images_per_s_ours_over_naive'], '.2f')}x")
    for c, r in ratios["images_per_s_ours_over_unbatched"].items():
        lines.append(f"  c={c}: images/s ours / ours-unbatched {_fmt(r, '.2f')}x")
    return "\n".join(lines)
