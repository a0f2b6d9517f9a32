"""Observability of the shared app: Prometheus metrics scraped from Ray's metrics endpoint of the
local cluster match the requests sent; `/health` answers at once while generations run; `/ready`
and `/v1/status` describe the app and agree with its job store.

Ray exports application metrics with a `ray_` prefix (counters with `_total`), from every process
to its node's metrics agent every `metrics_report_interval_ms`; the test polls (bounded) until the
export catches up.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import generate
from tests.integration.conftest import APP

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
EXPORT_WAIT_S = 90.0
STAGES = ("text_encoder", "denoiser", "vae_decoder")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def metrics_url(ray_cluster) -> str:
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


def report_interval_s() -> float:
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every `dit_serve` sample on the endpoint."""
    text = requests.get(url, timeout=30).text
    out = []
    for line in text.splitlines():
        match = SAMPLE_RE.match(line)
        if match and "dit_serve" in match.group(1):
            labels = dict(LABEL_RE.findall(match.group(2) or ""))
            out.append((match.group(1), labels, float(match.group(3))))
    return out


def total(samples, name: str, **labels: str) -> float:
    """Summed over this app's series (replicas, processes) whose labels include `labels`."""
    labels["application"] = APP
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def settled(url: str) -> list:
    """A scrape that holds everything already sent: two scrapes two export periods apart agree."""
    deadline = time.monotonic() + EXPORT_WAIT_S
    last = sorted(map(repr, scrape(url)))
    while time.monotonic() < deadline:
        # The exporter's period is what is waited for: no event says "all of it was exported".
        threading.Event().wait(2 * report_interval_s())
        now = scrape(url)
        if sorted(map(repr, now)) == last:
            return now
        last = sorted(map(repr, now))
    raise AssertionError(f"metrics did not settle within {EXPORT_WAIT_S}s")


def wait_for(check, what, timeout_s: float = EXPORT_WAIT_S):
    """Poll `check()` (a value, or None/False while not yet) until it holds; bounded. `what`
    (a string, or a function of the last value) says what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what(value) if callable(what) else what
            raise AssertionError(f"{said}: not within {timeout_s}s")
        threading.Event().wait(0.5)


def status_of(base_url: str) -> dict:
    response = requests.get(f"{base_url}/v1/status", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def idle(base_url: str) -> dict:
    """Wait until no request of the app is queued or running (earlier tests' jobs included)."""
    return wait_for(
        lambda: (s := status_of(base_url))["jobs"]["queued"] + s["jobs"]["running"] == 0 and s,
        "the app idle",
        timeout_s=300,
    )


def counted(before, after) -> dict:
    """The deltas the test's traffic must produce, by (metric, labels)."""
    r = "ray_dit_serve_http_requests_total"
    gen = "/v1/images/generations"
    keys = {
        "ok": (r, {"route": gen, "method": "POST", "status_code": "200", "outcome": "success"}),
        "bad_size": (r, {"route": gen, "method": "POST", "status_code": "400", "outcome": "client_error"}),
        "bad_job_id": (r, {"route": "/v1/images/jobs/{job_id}", "method": "GET", "status_code": "400"}),
        "wrong_method": (r, {"route": "/v1/status", "method": "POST", "status_code": "405"}),
        "unmatched": (r, {"route": "unmatched", "method": "GET", "status_code": "404"}),
        "images": ("ray_dit_serve_images_generated_total", {"kind": "sync"}),
        "succeeded": ("ray_dit_serve_jobs_finished_total", {"status": "succeeded", "kind": "sync"}),
        "steps_2_rows": ("ray_dit_serve_denoise_step_seconds_count", {"rows": "2"}),
    }
    for stage in STAGES:
        keys[f"batches/{stage}"] = ("ray_dit_serve_stage_batch_seconds_count", {"stage": stage})
        for le in ("1.5", "2.5"):  # batches of at most 1 and at most 2 rows (cumulative)
            keys[f"rows<={le[0]}/{stage}"] = ("ray_dit_serve_stage_batch_size_bucket", {"stage": stage, "le": le})
        keys[f"waits/{stage}"] = ("ray_dit_serve_stage_queue_wait_seconds_count", {"stage": stage})
    return {k: total(after, n, **lab) - total(before, n, **lab) for k, (n, lab) in keys.items()}


def test_metrics_count_exactly_what_was_sent(base_url, metrics_url):
    idle(base_url)
    before = settled(metrics_url)
    body = {"prompt": "metrics", "size": "64x64", "n": 2, "num_inference_steps": 2}
    for i in range(3):  # one at a time: each request is a batch of its own at every stage
        assert generate(base_url, {**body, "seed": i}).status_code == 200
    for _ in range(2):
        assert generate(base_url, {**body, "size": "100x100"}).status_code == 400
    assert requests.get(f"{base_url}/v1/images/jobs/not-a-job", timeout=30).status_code == 400
    for _ in range(2):
        assert requests.post(f"{base_url}/v1/status", timeout=30).status_code == 405
    assert requests.get(f"{base_url}/no/such/route/4f1c", timeout=30).status_code == 404
    expected = {
        "ok": 3,
        "bad_size": 2,
        "bad_job_id": 1,
        "wrong_method": 2,
        "unmatched": 1,
        "images": 6,
        "succeeded": 3,
        "steps_2_rows": 3 * 2,  # 2 steps of 2 rows per request
        **{f"batches/{s}": 3 for s in STAGES},
        **{f"waits/{s}": 3 for s in STAGES},
        **{f"rows<=2/{s}": 3 for s in STAGES},
        "rows<=1/text_encoder": 3,  # one prompt a batch
        "rows<=1/denoiser": 0,  # two images a batch
        "rows<=1/vae_decoder": 0,
    }
    last = {}

    def caught_up():
        last.update(counted(before, scrape(metrics_url)))
        return last == expected

    wait_for(caught_up, lambda _: f"the exported metrics reaching {expected} (last: {last})")
    samples = scrape(metrics_url)
    raw = {lab.get("route") for n, lab, _ in samples if n == "ray_dit_serve_http_requests_total"}
    assert "/v1/images/jobs/not-a-job" not in raw and "/no/such/route/4f1c" not in raw  # templates only
    for stage in STAGES:  # every request left its stage: the depth gauges are back at 0
        depth = [
            v
            for n, lab, v in samples
            if n == "ray_dit_serve_stage_queue_depth" and lab.get("stage") == stage and lab.get("application") == APP
        ]
        assert depth and set(depth) == {0.0}, (stage, depth)


def test_health_answers_at_once_while_generations_run(base_url):
    body = {"prompt": "keep the stages busy", "size": "256x256", "num_inference_steps": 50}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(generate, base_url, {**body, "seed": i}, 600) for i in range(8)]
        status = wait_for(
            lambda: (s := status_of(base_url))["jobs"]["running"] >= 8 and s, "8 requests running", timeout_s=120
        )
        depths = {name: stage["queue_depth"] for name, stage in status["stages"].items()}
        assert 1 <= sum(depths.values()) <= status["jobs"]["running"], (depths, status["jobs"])
        for _ in range(5):
            started = time.monotonic()
            health = requests.get(f"{base_url}/health", timeout=5)
            assert time.monotonic() - started < 1.0
            assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert not all(f.done() for f in futures)  # the probes ran while requests were in flight
        assert [f.result().status_code for f in futures] == [200] * 8


def test_ready_and_status_describe_the_app_and_agree_with_its_store(base_url, metrics_url):
    from deployments.job_store import open_job_store

    ready = requests.get(f"{base_url}/ready", timeout=60)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "stages": dict.fromkeys(STAGES, "ok")}

    status = idle(base_url)
    assert status["object"] == "app.status" and status["application"] == APP
    assert status["status"] == "RUNNING" and status["queue_depths_from"] == "job_store"
    assert list(status["stages"]) == list(STAGES)
    for stage in status["stages"].values():
        assert stage["status"] == "HEALTHY" and stage["replicas"]["running"] >= 1, stage
        assert stage["queue_depth"] == 0  # nothing runs now
    assert [d["deployment"] for d in status["ingress"]] == ["ImagesAPI"]

    store = open_job_store("sqlite", path=os.path.join(os.environ["DIT_SERVE_DATA"], f"{APP}.sqlite3"))
    counts = {s: store.counts_by_status().get(s, 0) for s in STATUSES}
    assert status["jobs"]["by_state"] == counts and counts["succeeded"] >= 1
    assert status["jobs"]["running"] == counts["running"] == 0

    def gauge_matches_store():
        samples = scrape(metrics_url)
        exported = {}
        for n, lab, v in samples:
            if n == "ray_dit_serve_jobs" and "state" in lab and lab.get("application") == APP:
                exported[lab["state"]] = max(v, exported.get(lab["state"], 0))  # max over replicas
        return exported == {s: float(c) for s, c in counts.items()}

    wait_for(gauge_matches_store, f"the jobs-by-state gauge reaching {counts}")

    spec = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/AppStatus"}
