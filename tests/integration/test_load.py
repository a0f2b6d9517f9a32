"""300 concurrent mixed requests (synchronous calls, jobs followed through their events, OpenAI
streams; three sizes, 2-8 steps, one or two images): no errors, every image equals its solo image
(diffusers in-process), every event stream holds only its own request's events, in order, and
ends with its own result."""

from __future__ import annotations

import requests

from tests.helpers import b64_image, concurrently, generate, job_events, max_level_diff, sse_events, submit_job

COUNT = 300
SIZES = [(64, 64), (128, 128), (192, 128)]
SUBJECTS = ["cat", "owl", "ship", "tower", "apple", "robot", "river", "lamp", "cloud", "horse"]


def body_for(i: int) -> dict:
    width, height = SIZES[i % 3]
    return {
        "prompt": f"a {SUBJECTS[i % 10]} number {i}, {'ink' if i % 2 else 'oil paint'}",
        "size": f"{width}x{height}",
        "num_inference_steps": 2 + (i * 7 // 3) % 7,
        "n": 1 + (i // 3) % 2,
        "seed": 7000 + i,
    }


def run_sync(base_url: str, body: dict) -> list[str]:
    r = generate(base_url, body, timeout=900)
    assert r.status_code == 200, r.text
    return [d["b64_json"] for d in r.json()["data"]]


def run_job(base_url: str, body: dict) -> list[str]:
    created = submit_job(base_url, body, timeout=900)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    events = job_events(base_url, job_id, timeout=900)
    assert all(e["data"]["job_id"] == job_id for e in events), "another request's event"
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    steps = [e["data"]["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, body["num_inference_steps"] + 1))
    assert events[-1]["event"] == "completed"
    return [d["b64_json"] for d in events[-1]["data"]["result"]["data"]]


def run_stream(base_url: str, body: dict) -> list[str]:
    partial = body["seed"] % 4
    streamed = {**body, "stream": True, "partial_images": partial}
    with requests.post(f"{base_url}/v1/images/generations", json=streamed, stream=True, timeout=900) as r:
        assert r.status_code == 200, r.text
        events = list(sse_events(r))
    kinds = [e["event"] for e in events]
    previews = min(partial, body["num_inference_steps"] - 1)
    assert kinds == ["image_generation.partial_image"] * previews + ["image_generation.completed"] * body["n"]
    assert [e["data"]["partial_image_index"] for e in events[:previews]] == list(range(previews))
    done = events[previews:]
    assert [e["data"]["seed"] for e in done] == [body["seed"] + k for k in range(body["n"])]
    return [e["data"]["b64_json"] for e in done]


RUNNERS = {"sync": run_sync, "job": run_job, "stream": run_stream}


def test_300_mixed_concurrent_requests(base_url, reference):
    work = [(("sync", "job", "stream")[i % 3], body_for(i)) for i in range(COUNT)]
    errors: list = []

    def run(item):
        kind, body = item
        try:
            return RUNNERS[kind](base_url, body)
        except Exception as exc:  # noqa: BLE001 - counted below, with what failed
            errors.append((kind, body, repr(exc)))
            return None

    results = concurrently(run, work, workers=COUNT)
    assert errors == [], errors[:5]
    worst = 0
    for (kind, body), images in zip(work, results):
        width, height = map(int, body["size"].split("x"))
        refs = reference.images(
            body["prompt"], body["seed"], width=width, height=height, steps=body["num_inference_steps"], n=body["n"]
        )
        assert len(images) == len(refs), (kind, body)
        diffs = [max_level_diff(b64_image(got), ref) for got, ref in zip(images, refs)]
        worst = max(worst, *diffs)
        assert max(diffs) <= 1, (kind, body, diffs)
    print(f"{COUNT} mixed requests: 0 errors, worst pixel difference {worst} level(s)")
