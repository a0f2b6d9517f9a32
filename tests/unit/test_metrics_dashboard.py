"""The Grafana dashboard and docs/observability.md against the metrics the code really defines:
no panel queries a metric that does not exist, and no metric is left out of either."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray.util.metrics import Counter, Histogram, Metric

from deployments.metrics import StageMetrics
from serve_app.metrics import ApiMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs"
NAME_RE = re.compile(r"\bray_dit_serve_[a-z_]+")


def defined() -> dict[str, Metric]:
    """Exported name (Ray's `ray_` prefix, counters' `_total`) -> metric, for every metric a stage
    replica and an ingress replica build."""
    out = {}
    for owner in (StageMetrics("denoiser"), ApiMetrics()):
        for metric in vars(owner).values():
            if isinstance(metric, Metric):
                out[f"ray_{metric._name}" + ("_total" if isinstance(metric, Counter) else "")] = metric
    return out


def base_name(name: str, metrics: dict[str, Metric]) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        stem = name.removesuffix(suffix)
        if stem != name and isinstance(metrics.get(stem), Histogram):
            return stem
    return name


def test_every_metric_is_prefixed_and_documented():
    metrics = defined()
    assert len(metrics) == 11
    doc = (DOCS / "observability.md").read_text()
    for name in metrics:
        assert name.startswith("ray_dit_serve_")
        assert f"`{name}`" in doc, f"{name} is not in docs/observability.md"
    assert {base_name(n, metrics) for n in NAME_RE.findall(doc)} <= set(metrics)


def test_the_dashboard_queries_every_metric_and_only_real_ones():
    metrics = defined()
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queried = {base_name(n, metrics) for p in panels for t in p["targets"] for n in NAME_RE.findall(t["expr"])}
    assert queried == set(metrics)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'application=~"$application"' in target["expr"], (panel["title"], target["expr"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
