"""A service that says no politely and keeps tenants apart, over HTTP on one app with API keys.

Admission is measured, not assumed: a burst at 10x the work budget gets 429 + Retry-After for the
excess and no 5xx, the admitted requests finish within their deadline, /health answers within a
second throughout, and the Ray processes' memory does not grow with the rejected requests. Jobs
run in priority order, deadlines end requests with 504, per-key limits give 429, and one key
never sees another key's jobs, events or images.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time

import pytest
import requests

from tests.helpers import concurrently, job_events, submit_job
from tests.integration.conftest import TEST_ARGS, own_store

APP, PREFIX = "adm", "/adm"
KEYS = {"alice": "sk-alice-1", "bob": "sk-bob-2", "carol": "sk-carol-3", "dave": "sk-dave-4"}
BURST_BODY = {"prompt": "a burst", "size": "256x256", "num_inference_steps": 50}
BURST_COST = 50 * 256 * 256 / 1e6  # images x steps x megapixels
CAPACITY = 6  # requests of BURST_BODY the budget admits at once
DEADLINE_S = 60.0


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def url(ray_cluster):
    from ray import serve

    from serve_app.app import build_app

    keys = [{"name": n, "sha256": hashlib.sha256(k.encode()).hexdigest()} for n, k in KEYS.items()]
    keys[2].update(max_active=1)  # carol
    keys[3].update(requests_per_minute=3)  # dave
    args = {
        **TEST_ARGS,
        "limits": {"max_size": 256, "max_steps": 400},
        "admission": {
            "max_pending_cost": CAPACITY * BURST_COST + 1e-6,
            "max_pending": 64,
            "default_deadline_s": DEADLINE_S,
        },
        "auth": {"keys": keys},
        "jobs": {"max_running": 1},  # one job at a time: the queue's order decides
    }
    serve.run(build_app(own_store(args, APP)), name=APP, route_prefix=PREFIX)
    yield ray_cluster + PREFIX
    serve.delete(APP)


def ray_rss_bytes() -> int:
    import psutil

    total = 0
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("ray::") or "raylet" in cmdline or "gcs_server" in cmdline:
                total += proc.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return total


def test_keys_are_required_except_for_liveness(url):
    no_key = requests.get(f"{url}/v1/models", timeout=30)
    wrong = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-nope"}, timeout=30)
    for response in (no_key, wrong):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["param"] == "Authorization"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert requests.post(f"{url}/v1/images/generations", json=BURST_BODY, timeout=30).status_code == 401
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/models", headers=auth("alice"), timeout=30).status_code == 200


def test_another_keys_jobs_events_and_images_are_not_found(url):
    body = {"prompt": "a private lighthouse", "size": "64x64", "seed": 5, "num_inference_steps": 2}
    job = submit_job(url, {**body, "response_format": "url"}, headers=auth("alice")).json()
    job_events(url, job["id"], headers=auth("alice"))
    done = requests.get(job["status_url"], headers=auth("alice"), timeout=30).json()
    assert done["status"] == "succeeded", done
    image_url = done["result"]["data"][0]["url"]

    for path in (job["status_url"], job["events_url"], image_url):
        theirs = requests.get(path, headers=auth("bob"), timeout=30)
        assert theirs.status_code == 404, (path, theirs.text)
    assert requests.delete(job["status_url"], headers=auth("bob"), timeout=30).status_code == 404
    listed = requests.get(f"{url}/v1/images/jobs", headers=auth("bob"), timeout=30).json()
    assert job["id"] not in [j["id"] for j in listed["data"]]
    assert job["id"] in [
        j["id"] for j in requests.get(f"{url}/v1/images/jobs", headers=auth("alice"), timeout=30).json()["data"]
    ]

    mine = requests.get(image_url, headers=auth("alice"), timeout=30)
    assert mine.status_code == 200
    same = requests.post(f"{url}/v1/images/generations", json=body, headers=auth("alice"), timeout=60)
    assert mine.content == base64.b64decode(same.json()["data"][0]["b64_json"])


def test_a_burst_at_ten_times_capacity_is_answered_429_never_5xx(url):
    health_latency: list[float] = []
    health_status: list[int] = []
    stop = threading.Event()

    def watch_health():
        while not stop.is_set():
            started = time.monotonic()
            response = requests.get(f"{url}/health", timeout=5)
            health_latency.append(time.monotonic() - started)
            health_status.append(response.status_code)
            stop.wait(0.2)  # the probe's period

    def post(i):
        started = time.monotonic()
        response = requests.post(
            f"{url}/v1/images/generations",
            json={**BURST_BODY, "seed": i},
            headers=auth("alice"),
            timeout=DEADLINE_S + 30,
        )
        return response.status_code, response.headers.get("retry-after"), time.monotonic() - started

    before = ray_rss_bytes()
    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        results = concurrently(post, list(range(10 * CAPACITY)), workers=10 * CAPACITY)
    finally:
        stop.set()
        watcher.join(timeout=10)
    after = ray_rss_bytes()

    statuses = [s for s, _, _ in results]
    admitted = [t for s, _, t in results if s == 200]
    rejected = [(s, ra) for s, ra, _ in results if s == 429]
    print(
        f"burst {len(results)}: {len(admitted)} admitted, {len(rejected)} rejected,"
        f" admitted max latency {max(admitted):.2f}s, ray rss {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    )
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {200, 429}, statuses
    assert len(admitted) >= CAPACITY  # at least one budget's worth ran
    assert len(rejected) >= 5 * CAPACITY  # far from everyone got in at once
    assert all(ra is not None and int(ra) >= 1 for _, ra in rejected)
    assert max(admitted) < DEADLINE_S
    assert health_status and set(health_status) == {200}
    assert max(health_latency) < 1.0, max(health_latency)
    assert after - before < 400 * 2**20, (before, after)


def test_high_priority_jobs_run_before_low_priority_ones_queued_earlier(url):
    blocker = submit_job(
        url, {"prompt": "a long one", "size": "256x256", "num_inference_steps": 250}, headers=auth("alice")
    ).json()
    low = [
        submit_job(url, {"prompt": f"low {i}", "size": "64x64", "num_inference_steps": 2, "priority": -1}, headers=auth("alice")).json()
        for i in range(5)
    ]
    high = [
        submit_job(url, {"prompt": f"high {i}", "size": "64x64", "num_inference_steps": 2, "priority": 3}, headers=auth("alice")).json()
        for i in range(3)
    ]
    high_submitted = time.time()
    assert all("id" in j for j in [blocker, *low, *high]), [blocker, *low, *high]

    def dispatched_at(job) -> float:
        events = job_events(url, job["id"], headers=auth("alice"))
        assert events[-1]["event"] == "completed", events[-1]
        return next(e["data"]["created_at"] for e in events if e["event"] == "dispatched")

    high_at = [dispatched_at(j) for j in high]
    low_at = [dispatched_at(j) for j in low]
    still_queued = [t for t in low_at if t > high_submitted]
    assert len(still_queued) >= 3, (low_at, high_submitted)  # the blocker held them in the queue
    assert max(high_at) < min(still_queued), (high_at, low_at)


def test_deadlines_end_requests_with_504_and_free_their_place(url):
    # Runs out mid-run: the service stops its work and says why.
    started = time.monotonic()
    slow = requests.post(
        f"{url}/v1/images/generations",
        json={"prompt": "too slow", "size": "256x256", "num_inference_steps": 250, "deadline_s": 1.0},
        headers=auth("bob"),
        timeout=120,
    )
    assert slow.status_code == 504, slow.text
    error = slow.json()["error"]
    assert (error["code"], error["param"]) == ("deadline_exceeded", "deadline_s")
    assert time.monotonic() - started < 30
    job_id = slow.headers["x-dit-job-id"]
    record = requests.get(f"{url}/v1/images/jobs/{job_id}", headers=auth("bob"), timeout=30).json()
    assert record["status"] == "failed" and record["error"]["code"] == "deadline_exceeded", record
    # Its place is free again: requests that need the whole budget are admitted.
    ok = concurrently(
        lambda i: requests.post(f"{url}/v1/images/generations", json=BURST_BODY, headers=auth("bob"), timeout=60),
        list(range(CAPACITY)),
        workers=CAPACITY,
    )
    assert [r.status_code for r in ok] == [200] * CAPACITY, [r.text for r in ok]

    # Expires while queued behind a long job: ends without running.
    blocker = submit_job(
        url, {"prompt": "a long one", "size": "256x256", "num_inference_steps": 200}, headers=auth("bob")
    ).json()
    late = submit_job(
        url, {"prompt": "late", "size": "64x64", "num_inference_steps": 2, "deadline_s": 0.5}, headers=auth("bob")
    ).json()
    events = job_events(url, late["id"], headers=auth("bob"))
    assert events[-1]["event"] == "failed", events
    assert events[-1]["data"]["error"]["code"] == "deadline_exceeded"
    assert "dispatched" not in [e["event"] for e in events]
    job_events(url, blocker["id"], headers=auth("bob"))


def test_a_key_over_its_unfinished_limit_gets_429(url):
    body = {"prompt": "carol's", "size": "64x64", "num_inference_steps": 2}
    first = submit_job(url, {**body, "num_inference_steps": 200, "size": "256x256"}, headers=auth("carol"))
    assert first.status_code == 202, first.text
    busy = submit_job(url, body, headers=auth("carol"))  # max_active 1: the first is unfinished
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "rate_limit_exceeded" and int(busy.headers["retry-after"]) >= 1
    assert submit_job(url, body, headers=auth("alice")).status_code == 202  # other keys unaffected
    job_events(url, first.json()["id"], headers=auth("carol"))
    again = submit_job(url, body, headers=auth("carol"))
    assert again.status_code == 202, again.text  # its place is back once the first finished
    job_events(url, again.json()["id"], headers=auth("carol"))


def test_a_key_over_its_request_rate_gets_429(url):
    body = {"prompt": "dave's", "size": "64x64", "num_inference_steps": 2}
    for _ in range(2):  # the limit counts per clock minute: retry once if the minute turned
        window = time.time() // 60
        answers = [submit_job(url, body, headers=auth("dave")) for _ in range(4)]
        if time.time() // 60 == window:
            break
    assert [a.status_code for a in answers[:3]] == [202, 202, 202], [a.text for a in answers]
    over = answers[3]
    assert over.status_code == 429, over.text
    error = over.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "3 requests a minute" in error["message"]
    assert 1 <= int(over.headers["retry-after"]) <= 60
    for answer in answers[:3]:
        job_events(url, answer.json()["id"], headers=auth("dave"))
