"""Cancellation: a DELETE, or a client that goes away from a synchronous or streamed request, stops
the request within two denoising steps, drops its rows from the running batch, and leaves its
batch-mates' images exactly as they are alone. Counted from the request's own event log: the
steps logged after `cancel_requested`."""

from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from tests.helpers import (
    b64_image,
    concurrently,
    job_events,
    max_level_diff,
    sse_events,
    submit_job,
)
from tests.integration.conftest import APP

BOUND_S = 120  # bounds waits on the service's own signals; never a speed assertion


def steps_after_cancel(events: list[dict]) -> list[int]:
    asked = next(i for i, e in enumerate(events) if e["event"] == "cancel_requested")
    return [e["data"]["step"] for e in events[asked:] if e["event"] == "step"]


@pytest.fixture(scope="module")
def store(base_url):
    """The app's job store, read from this process as an operator could."""
    from deployments.job_store import open_job_store

    return open_job_store("sqlite", path=os.path.join(os.environ["DIT_SERVE_DATA"], f"{APP}.sqlite3"))


def as_dicts(events) -> list[dict]:
    return [{"event": e.type, "id": str(e.seq), "data": e.data} for e in events]


def test_delete_stops_a_running_job_and_its_batch_mates_are_unaffected(base_url, reference):
    body = {"size": "256x256", "num_inference_steps": 50}
    bodies = [{**body, "prompt": p, "seed": 100 + i} for i, p in enumerate(["a doomed job", "a fox", "a hen"])]
    jobs = concurrently(lambda b: submit_job(base_url, b).json(), bodies, workers=3)
    # The app's denoiser runs in step mode: the three share its calls once they have all joined
    # (a step event's `rows`); the cancel comes while they do.
    running = job_events(base_url, jobs[0]["id"], until=lambda e: e["event"] == "step" and e["data"].get("rows") == 3)
    assert running[-1]["data"]["step"] < 50

    cancel = requests.delete(jobs[0]["status_url"], timeout=30)
    assert cancel.status_code == 200
    assert cancel.json()["status"] == "running" and cancel.json()["cancel_requested"] is True
    events = job_events(base_url, jobs[0]["id"])
    assert events[-1]["event"] == "cancelled"
    print(f"DELETE: steps after cancel_requested {steps_after_cancel(events)}")
    assert len(steps_after_cancel(events)) <= 2, steps_after_cancel(events)
    assert events[-1]["data"]["stage"] == "denoiser" and events[-1]["data"]["steps_done"] < 50
    final = requests.get(jobs[0]["status_url"], timeout=30).json()
    assert final["status"] == "cancelled" and "result" not in final

    for job, b in zip(jobs[1:], bodies[1:]):
        assert job_events(base_url, job["id"])[-1]["event"] == "completed"
        got = requests.get(job["status_url"], timeout=30).json()["result"]["data"][0]["b64_json"]
        ref = reference.image(b["prompt"], b["seed"], width=256, height=256, steps=50)
        assert max_level_diff(b64_image(got), ref) <= 1
    assert requests.delete(jobs[0]["status_url"], timeout=30).json()["status"] == "cancelled"


def wait_for(store, predicate, what: str):
    """Block on the store's own event log until `predicate(event)` holds for a new event."""
    cursor = store.tail_cursor()
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        events, cursor = store.tail(cursor, 5.0)
        for event in events:
            if predicate(event):
                return event
    raise AssertionError(f"no {what} within {BOUND_S}s")


def test_a_synchronous_client_that_disconnects_stops_its_request(base_url, store):
    url = urlparse(base_url)
    rid = f"disconnect-{os.getpid()}-{time.monotonic_ns()}"
    body = json.dumps({"prompt": "nobody waits", "size": "256x256", "n": 2, "num_inference_steps": 50}).encode()
    sock = socket.create_connection((url.hostname, url.port))
    try:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: " + url.hostname.encode()
            + b"\r\nContent-Type: application/json\r\nx-request-id: " + rid.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        first = wait_for(store, lambda e: e.type == "dispatched" and store.get(e.job_id).request["request_id"] == rid, "record")
        job_id = first.job_id
        wait_for(store, lambda e: e.job_id == job_id and e.type == "step" and e.data["step"] >= 2, "step 2")
    finally:
        sock.close()
    end = wait_for(store, lambda e: e.job_id == job_id and e.type in ("cancelled", "completed", "failed"), "its end")
    events = as_dicts(store.events(job_id))
    assert end.type == "cancelled", events[-3:]
    print(f"sync disconnect: steps after cancel_requested {steps_after_cancel(events)}")
    assert events[-1]["event"] == "cancelled" and events[-1]["data"]["steps_done"] < 50
    assert len(steps_after_cancel(events)) <= 2, steps_after_cancel(events)
    assert next(e for e in events if e["event"] == "cancel_requested")["data"]["reason"] == "the client disconnected"


def test_a_streaming_client_that_disconnects_stops_its_request(base_url, store):
    body = {"prompt": "a stream nobody reads", "size": "256x256", "num_inference_steps": 50, "stream": True, "partial_images": 3}
    with requests.post(f"{base_url}/v1/images/generations", json=body, stream=True, timeout=BOUND_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        job_id = r.headers["x-dit-job-id"]
        first = next(sse_events(r))
        assert first["event"] == "image_generation.partial_image"
    end = wait_for(store, lambda e: e.job_id == job_id and e.type in ("cancelled", "completed", "failed"), "its end")
    events = as_dicts(store.events(job_id))
    assert end.type == "cancelled"
    print(f"stream disconnect: steps after cancel_requested {steps_after_cancel(events)}")
    assert len(steps_after_cancel(events)) <= 2, steps_after_cancel(events)
    assert events[-1]["data"]["steps_done"] < 50
