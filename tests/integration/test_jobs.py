"""Async jobs over HTTP: accepted with 202, followed through server-sent events (in order,
resumable), read back with the same images a synchronous call gives, listed in pages, made
idempotent by a key; every client mistake is a 4xx naming the parameter."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.helpers import (
    b64_image,
    decode_image,
    generate,
    job_events,
    max_level_diff,
    sse_events,
    submit_job,
)

STAGE_ORDER = ["text_encoder", "denoiser", "vae_decoder"]


def test_a_job_runs_through_every_stage_and_its_events_say_so(base_url, reference):
    body = {"prompt": "a red barn", "size": "128x128", "seed": 21, "n": 2, "num_inference_steps": 6, "partial_images": 2}
    created = submit_job(base_url, body)
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["object"] == "image.job" and job["status"] in ("queued", "running")
    assert created.headers["location"] == job["status_url"] == f"{base_url}/v1/images/jobs/{job['id']}"
    assert job["events_url"] == job["status_url"] + "/events"

    events = job_events(base_url, job["id"])
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["job_id"] == job["id"] for e in events)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("dispatched") == 1
    stages = [(e["data"]["stage"], e["data"]["state"]) for e in events if e["event"] == "stage"]
    assert stages == [(s, state) for s in STAGE_ORDER for state in ("started", "finished")]
    steps = [e["data"]["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, 7))
    first, last = kinds.index("step"), len(kinds) - 1 - kinds[::-1].index("step")
    assert kinds.index("stage") < first and last < kinds.index("completed")
    previews = [e["data"] for e in events if e["event"] == "preview"]
    assert [p["index"] for p in previews] == [0, 1] and [p["step"] for p in previews] == [2, 4]
    assert decode_image(base64.b64decode(previews[0]["b64_json"])).shape == (16, 16, 3)

    refs = reference.images("a red barn", 21, width=128, height=128, steps=6, n=2)
    streamed = events[-1]["data"]["result"]["data"]
    final = requests.get(job["status_url"], timeout=30).json()
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert final["finished_at"] >= final["started_at"] >= final["created_at"]
    assert "progress" not in final and "queue_position" not in final
    for got in (streamed, final["result"]["data"]):
        assert [d["seed"] for d in got] == [21, 22]
        assert [max_level_diff(b64_image(d["b64_json"]), r) for d, r in zip(got, refs)] == [0, 0]


def test_url_images_are_the_bytes_a_b64_response_carries(base_url):
    body = {"prompt": "a green door", "size": "64x64", "seed": 4}
    sync = generate(base_url, body)
    assert sync.status_code == 200
    job = submit_job(base_url, {**body, "response_format": "url"}).json()
    assert job_events(base_url, job["id"])[-1]["event"] == "completed"
    data = requests.get(job["status_url"], timeout=30).json()["result"]["data"]
    fetched = requests.get(data[0]["url"], timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(sync.json()["data"][0]["b64_json"])


def test_a_synchronous_call_is_a_job_its_connection_waits_for(base_url):
    response = generate(base_url, {"prompt": "a bell", "size": "64x64", "seed": 2})
    assert response.status_code == 200
    job_id = response.headers["x-dit-job-id"]
    record = requests.get(f"{base_url}/v1/images/jobs/{job_id}", timeout=30).json()
    assert record["status"] == "succeeded" and record["result"]["data"][0]["seed"] == 2
    kinds = [e["event"] for e in job_events(base_url, job_id)]
    assert kinds[0] == "dispatched" and kinds[-1] == "completed"
    assert "Server-Timing" in response.headers and "denoiser;dur=" in response.headers["Server-Timing"]


def test_reconnecting_with_last_event_id_resumes_without_loss(base_url):
    job = submit_job(base_url, {"prompt": "a kite", "size": "64x64", "seed": 8, "num_inference_steps": 8}).json()
    head = job_events(base_url, job["id"], until=lambda e: int(e["id"]) == 4)
    tail = job_events(base_url, job["id"], headers={"Last-Event-ID": head[-1]["id"]})
    whole = job_events(base_url, job["id"])
    assert [e["id"] for e in head + tail] == [e["id"] for e in whole]
    assert [e["data"] for e in head + tail] == [e["data"] for e in whole]
    assert job_events(base_url, job["id"], headers={"Last-Event-ID": whole[-1]["id"]}) == []
    after = requests.get(f"{job['events_url']}?after=3", stream=True, timeout=60)
    assert [e["id"] for e in sse_events(after)] == [e["id"] for e in whole[3:]]


def test_an_idempotency_key_returns_the_first_job(base_url):
    body = {"prompt": "a teapot", "size": "64x64"}
    key = {"Idempotency-Key": "order-1234"}
    first = submit_job(base_url, body, key)
    again = submit_job(base_url, body, key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    other = submit_job(base_url, {**body, "prompt": "a kettle"}, key)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    assert first.json()["id"] in other.json()["error"]["message"]
    for bad in ("", "x" * 256, "with space"):
        r = submit_job(base_url, body, {"Idempotency-Key": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key", bad
    # the random seed was fixed once: the replayed job is the same job, with the same images
    job_events(base_url, first.json()["id"])
    assert requests.get(first.json()["status_url"], timeout=30).json()["status"] == "succeeded"


def test_jobs_are_listed_in_pages(base_url):
    ids = [submit_job(base_url, {"prompt": f"a pebble {i}", "size": "64x64", "num_inference_steps": 1}).json()["id"] for i in range(5)]

    def pages(order: str) -> list[str]:
        seen, after = [], None
        for _ in range(100):
            params = {"limit": 2, "order": order, **({"after": after} if after else {})}
            page = requests.get(f"{base_url}/v1/images/jobs", params=params, timeout=30).json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                return seen
            assert page["last_id"] == page["data"][-1]["id"]
            after = page["last_id"]
        raise AssertionError("pagination did not end")

    newest_first, oldest_first = pages("desc"), pages("asc")
    assert len(set(newest_first)) == len(newest_first) and sorted(newest_first) == sorted(oldest_first)
    assert [i for i in newest_first if i in ids] == ids[::-1]
    assert [i for i in oldest_first if i in ids] == ids


@pytest.mark.parametrize(
    "method, path, status, param",
    [
        ("get", "/v1/images/jobs/job_000000000000000000000000", 404, "job_id"),
        ("delete", "/v1/images/jobs/job_000000000000000000000000", 404, "job_id"),
        ("get", "/v1/images/jobs/job_000000000000000000000000/events", 404, "job_id"),
        ("get", "/v1/images/jobs/not-a-job", 400, "job_id"),
        ("get", "/v1/images/jobs/job_ABCDEF000000000000000000", 400, "job_id"),
        ("delete", "/v1/images/jobs/job_123", 400, "job_id"),
        ("get", "/v1/images/jobs?limit=0", 400, "limit"),
        ("get", "/v1/images/jobs?limit=101", 400, "limit"),
        ("get", "/v1/images/jobs?order=up", 400, "order"),
        ("get", "/v1/images/jobs?after=nope", 400, "after"),
    ],
)
def test_bad_job_requests_name_the_parameter(base_url, method, path, status, param):
    r = getattr(requests, method)(f"{base_url}{path}", timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_bad_job_bodies_are_rejected_before_anything_is_queued(base_url):
    for body, param in [
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "size": "100x100"}, "size"),
        ({"prompt": "x", "partial_images": 4}, "partial_images"),
    ]:
        r = submit_job(base_url, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    events = requests.get(f"{base_url}/v1/images/jobs/job_000000000000000000000000/events", headers={"Last-Event-ID": "x"}, timeout=30)
    assert events.status_code == 404  # the job is looked up first


def test_a_malformed_last_event_id_is_a_400(base_url):
    job = submit_job(base_url, {"prompt": "a cup", "size": "64x64", "num_inference_steps": 1}).json()
    r = requests.get(job["events_url"], headers={"Last-Event-ID": "five"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"


def test_a_streamed_generation_with_the_openai_client(base_url, reference):
    """OpenAI's image streaming events: partial images along the way, then the image."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stream = client.images.generate(
        model="tiny-flux",
        prompt="a paper boat",
        size="128x128",
        stream=True,
        partial_images=2,
        n=2,
        extra_body={"seed": 33, "num_inference_steps": 6},
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    refs = reference.images("a paper boat", 33, width=128, height=128, steps=6, n=2)
    for event, ref in zip(events[2:], refs):
        assert event.size == "128x128" and event.output_format == "png"
        assert max_level_diff(b64_image(event.b64_json), ref) == 0
