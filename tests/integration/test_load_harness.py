"""The load harness (bench/load.py and its modules) against the deployed app: closed and open loop
count, time and summarise real requests; the report writer's JSON and plots; the naive baseline
server answers PNGs and frees its port. Small requests only (64x64, 2 steps): this file stays fast."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from functools import partial

import pytest
import requests

from bench.loadgen import (
    Outcome,
    Record,
    closed_loop,
    draw_requests,
    open_loop,
    poisson_schedule,
    summarize,
)
from bench.report import LATENCY_PLOT, THROUGHPUT_PLOT, build_report, plot, table, write_json
from bench.targets import NaiveTarget, http_send

TEMPLATES = [
    {"weight": 0.5, "size": "64x64", "num_inference_steps": 2, "n": 1},
    {"weight": 0.5, "size": "64x64", "num_inference_steps": 2, "n": 2},
]
STAGES = {"text_encoder", "denoiser", "vae_decoder"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def max_in_flight(records) -> int:
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def check_figures(summary: dict, records, bodies, wall: float) -> None:
    assert summary["planned"] == len(bodies)
    assert summary["sent"] == len(records) == len(bodies)
    assert summary["ok"] + summary["failed"] == summary["sent"]
    assert summary["failed"] == 0 and summary["status_codes"] == {"200": len(bodies)}, summary["errors"]
    assert sorted(r.index for r in records) == list(range(len(bodies)))  # each body sent once
    assert summary["images"] == sum(b["n"] for b in bodies) == sum(r.outcome.images for r in records)
    assert summary["wall_s"] == wall
    assert summary["images_per_s"] == pytest.approx(summary["images"] / wall)
    assert summary["requests_per_s"] == pytest.approx(len(bodies) / wall)
    lat, latencies = summary["latency_s"], [r.latency for r in records]
    assert lat["min"] == min(latencies) and lat["max"] == max(latencies)
    assert lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    # Our app's headers (x-dit-batch-sizes, Server-Timing): every stage's batch size for every
    # request, and its batch time (the ingress's own `encode` step comes along too).
    assert STAGES <= set(summary["batch_sizes"])
    assert all(sum(counts.values()) == len(bodies) for counts in summary["batch_sizes"].values())
    assert STAGES <= set(summary["stage_time_s"]) and all(v > 0 for v in summary["stage_time_s"].values())


@pytest.fixture(scope="module")
def closed_run(base_url):
    bodies = draw_requests(TEMPLATES, 6, seed=3)
    records, wall = closed_loop(partial(http_send, base_url), bodies, 3, max_seconds=60, timeout=60)
    return bodies, records, wall, summarize(records, wall, len(bodies))


@pytest.fixture(scope="module")
def open_run(base_url):
    bodies = draw_requests(TEMPLATES, 5, seed=11)
    records, wall = open_loop(partial(http_send, base_url), bodies, 5.0, seed=11, max_seconds=60, timeout=60)
    return bodies, records, wall, summarize(records, wall, len(bodies))


# --- pure parts -------------------------------------------------------------------------------


def test_workload_draw_is_deterministic_and_follows_the_weights():
    templates = [{"weight": 0.7, "size": "256x256", "num_inference_steps": 4}, {"weight": 0.3, "size": "128x128"}]
    draw = draw_requests(templates, 4000, seed=5)
    assert draw == draw_requests(templates, 4000, seed=5)
    assert draw != draw_requests(templates, 4000, seed=6)
    share = sum(b["size"] == "256x256" for b in draw) / len(draw)
    assert 0.67 <= share <= 0.73
    assert all("weight" not in b and b["prompt"] and b["n"] == 1 for b in draw)
    assert len({b["seed"] for b in draw}) == len(draw)
    assert all(b["num_inference_steps"] == 4 for b in draw if b["size"] == "256x256")


def test_latency_is_also_given_per_step_count():
    """A mixed workload's short and long requests get their own percentiles (failures left out)."""
    bodies = [{"num_inference_steps": 8}, {"num_inference_steps": 50}, {"num_inference_steps": 8}, {"num_inference_steps": 8}]
    latencies, statuses = [0.2, 1.5, 0.4, 9.0], [200, 200, 200, 429]
    records = [Record(i, 0.0, 0.0, lat, Outcome(code, images=1)) for i, (lat, code) in enumerate(zip(latencies, statuses))]
    by_steps = summarize(records, 2.0, 4, bodies)["latency_by_steps_s"]
    assert set(by_steps) == {"8", "50"}
    assert by_steps["8"]["ok"] == 2 and by_steps["8"]["max"] == pytest.approx(0.4)
    assert by_steps["8"]["p50"] == pytest.approx(0.3)
    assert by_steps["50"]["ok"] == 1 and by_steps["50"]["p99"] == pytest.approx(1.5)
    assert summarize(records, 2.0, 4)["latency_by_steps_s"] is None


def test_poisson_schedule_is_seeded():
    schedule = poisson_schedule(4.0, 5000, seed=1)
    assert schedule == poisson_schedule(4.0, 5000, seed=1)
    assert schedule != poisson_schedule(4.0, 5000, seed=2)
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    assert schedule[-1] / len(schedule) == pytest.approx(1 / 4.0, rel=0.06)  # mean gap 1/rate


def test_drivers_stop_at_max_seconds():
    """A stand-in target that takes 50 ms a request: neither driver starts one past the deadline."""

    def fifty_ms(body, timeout):
        time.sleep(0.05)  # the stand-in's service time
        return Outcome(200, images=body["n"])

    bodies = draw_requests(TEMPLATES, 200, seed=0)
    records, _ = open_loop(fifty_ms, bodies, 50.0, seed=0, max_seconds=0.5, timeout=5)
    assert len(records) == sum(t <= 0.5 for t in poisson_schedule(50.0, 200, seed=0)) < 200
    records, wall = closed_loop(fifty_ms, bodies, 2, max_seconds=0.3, timeout=5)
    assert 0 < len(records) < 200 and wall < 1.5
    assert all(r.start - min(x.start for x in records) < 0.3 for r in records)


# --- against the deployed app -----------------------------------------------------------------


def test_closed_loop_against_the_app(closed_run):
    bodies, records, wall, summary = closed_run
    check_figures(summary, records, bodies, wall)
    assert max_in_flight(records) <= 3
    assert all(r.latency == pytest.approx(r.end - r.start, abs=0.01) for r in records)


def test_open_loop_against_the_app_follows_the_seeded_schedule(open_run):
    bodies, records, wall, summary = open_run
    check_figures(summary, records, bodies, wall)
    offsets = poisson_schedule(5.0, len(bodies), seed=11)
    by_index = sorted(records, key=lambda r: r.index)
    begin = by_index[0].scheduled - offsets[0]
    assert [r.scheduled - begin for r in by_index] == pytest.approx(offsets, abs=1e-6)
    assert all(0 <= r.start - r.scheduled < 0.5 for r in records)  # sent on time, never early
    assert all(r.latency >= r.end - r.start for r in records)


def test_report_writer(tmp_path, closed_run, open_run):
    closed = {"concurrency": 3, **closed_run[3], "gpu_util_mean": None}
    opened = {"rate": 5.0, **open_run[3], "gpu_util_mean": None}
    targets = {name: {"closed": [closed], "open": [opened]} for name in ("inprocess", "ours")}
    meta = {"machine": {"device": "cpu"}, "date": "today", "command": "test", "config": {}, "workload": TEMPLATES,
            "settings": {}}
    path = write_json(tmp_path, build_report(meta, targets))
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "date", "command", "config", "workload", "settings", "targets", "ratios"}
    assert report["targets"]["ours"]["closed"][0]["ok"] == 6
    top = report["ratios"]["throughput_ours_over_inprocess_at_max_concurrency"]
    assert top == {"concurrency": 3, "ratio": 1.0}
    assert report["ratios"]["ours_vs_naive"] == {} and report["ratios"]["solo_latency_ours_over_inprocess"] is None
    from PIL import Image

    for png in plot(tmp_path, targets):
        assert png.name in (LATENCY_PLOT, THROUGHPUT_PLOT)
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0
    assert "ours" in table(targets) and "open" in table(targets)


# --- the naive baseline server ------------------------------------------------------------------


def test_naive_server_answers_pngs_and_frees_its_port(tiny_flux_path, tmp_path):
    from PIL import Image

    target = NaiveTarget(tiny_flux_path, "float32", tmp_path / "naive.log", startup_timeout=60)
    try:
        target.start()  # polls /health
        proc, port = target.proc, int(target.url.rsplit(":", 1)[1])
        for n in (1, 2):
            body = {"prompt": "a lamp", "size": "64x64", "num_inference_steps": 2, "n": n, "seed": 4}
            r = requests.post(f"{target.url}/v1/images/generations", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert isinstance(r.json()["created"], int) and len(r.json()["data"]) == n
            for item in r.json()["data"]:
                png = base64.b64decode(item["b64_json"])
                assert png[:8] == PNG_SIGNATURE
                with Image.open(io.BytesIO(png)) as im:
                    assert im.size == (64, 64)
    finally:
        target.stop()
    assert proc.poll() is not None and target.proc is None
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as s:  # and a server could bind it again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# --- step vs request batching (bench/bench_modes.py) --------------------------------------------


def test_the_modes_benchmark_runs_both_batching_modes(ray_cluster, tmp_path):
    """bench_modes' loop on the tiny model: the request mode, then the step mode, each deployed,
    warmed up and given the same seeded arrivals at a fraction of the capacity that the request
    mode's solo times give, then a closed loop; report.json compares the two."""
    import copy

    from bench.bench_modes import parse_args, run_modes
    from bench.targets import RayCluster
    from tests.integration.conftest import TEST_ARGS

    templates = [
        {"weight": 0.5, "size": "64x64", "num_inference_steps": 2, "n": 1},
        {"weight": 0.5, "size": "64x64", "num_inference_steps": 12, "n": 1},
    ]
    bodies = draw_requests(templates, 8, seed=2)
    ns = parse_args(["--loads", "0.8", "--requests", "8", "--saturation", "4", "--solo", "1", "--repeats", "1",
                     "--max-seconds", "30", "--timeout", "60"])
    args = copy.deepcopy(TEST_ARGS)
    args["denoiser"]["batching"]["batch_wait_timeout_s"] = 0.05
    report = {"capacity": None, "runs": []}
    run_modes(report, args, {}, RayCluster("cpu", url=ray_cluster), templates, bodies, ns, tmp_path,
              time.perf_counter(), route_prefix="/modes")

    assert [(r["mode"], r.get("error")) for r in report["runs"]] == [("request", None), ("step", None)]
    capacity = report["capacity"]
    assert capacity["mode"] == "request" and [t["template"]["num_inference_steps"] for t in capacity["templates"]] == [2, 12]
    assert capacity["capacity_per_s"] == pytest.approx(1 / capacity["mean_solo_s"])
    for t in capacity["templates"]:  # the denoiser's share (Server-Timing) and what is left outside it
        assert 0 < t["denoiser_s"] < t["median_s"] and t["fixed_s"] == pytest.approx(t["median_s"] - t["denoiser_s"])
    for run in report["runs"]:
        (point,) = run["points"]["open"]
        assert point["rate"] == pytest.approx(0.8 * capacity["capacity_per_s"])
        assert point["status_codes"] == {"200": 8} and set(point["latency_by_steps_s"]) == {"2", "12"}
        assert point["latency_beyond_fixed_s"]["p50"] < point["latency_s"]["p50"]
        closed = run["points"]["closed"]
        assert closed["concurrency"] == 4 and closed["status_codes"] == {"200": 8} and closed["images"] == 8
    (row,) = report["comparison"]["open"]
    for mode in ("request", "step"):
        assert row[mode]["runs"] == 1 and row[mode]["shortest_steps"] == "2" and row[mode]["failed"] == 0
    assert row["p99_shortest_step_over_request"] == pytest.approx(
        row["step"]["p99_shortest_s"] / row["request"]["p99_shortest_s"])
    assert report["comparison"]["saturation"]["step_over_request"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["runs"] == report["runs"]
