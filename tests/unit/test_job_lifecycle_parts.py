"""The parts of a request's life that need no Ray: following a job's log (history, then live
events, resumable), retention deleting a job's images, seeds fixed once, job ids, previews."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from deployments.denoise_loop import preview_steps
from deployments.job_store import open_job_store
from deployments.job_store.base import RUNNING, JobRecord, NewEvent
from serve_app.config import AppConfig
from serve_app.event_hub import EventHub
from serve_app.image_store import LocalImageStore
from serve_app.jobs import Jobs, check_job_id, new_job_id, request_hash
from serve_app.planning import Planner
from serve_app.protocol import parse_generation_request
from serve_app.streams import follow


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def store(tmp_path):
    return open_job_store("sqlite", path=str(tmp_path / "jobs.db"))


def running(store, job_id: str) -> None:
    store.create(JobRecord(job_id, "job", "anonymous", {}, status=RUNNING, lease_owner="w", lease_expires=1e12))


def test_follow_gives_history_then_live_events_in_order_and_ends_with_the_job(store):
    running(store, "job-1")
    running(store, "job-2")
    store.append_events([NewEvent("job-1", "stage", {"n": 1}), NewEvent("job-2", "stage", {"n": 99})])
    subscribed = threading.Event()

    def writer():
        subscribed.wait(30)
        for n in range(2, 6):
            store.append_events([NewEvent("job-1", "step", {"n": n}), NewEvent("job-2", "step", {"n": -n})])
        store.finish("job-1", "w", "succeeded", retention_s=60, result={}, event=NewEvent("job-1", "completed"))

    async def read(after: int):
        hub = EventHub(store)
        out = []
        async for event in follow(store, hub, "job-1", after):
            out.append(event)
            if len(out) == 1:
                subscribed.set()
        return out

    thread = threading.Thread(target=writer)
    thread.start()
    events = asyncio.run(asyncio.wait_for(read(0), 60))
    thread.join()
    assert [e.seq for e in events] == list(range(1, 7))
    assert {e.job_id for e in events} == {"job-1"}
    assert [e.data.get("n") for e in events] == [1, 2, 3, 4, 5, None] and events[-1].type == "completed"
    resumed = asyncio.run(asyncio.wait_for(read(3), 30))  # Last-Event-ID: 3
    assert [e.seq for e in resumed] == [4, 5, 6]
    assert asyncio.run(asyncio.wait_for(read(6), 30)) == []  # nothing after the end: no wait


def test_retention_deletes_records_their_events_and_their_images(tmp_path):
    clock = Clock()
    store = open_job_store("sqlite", path=str(tmp_path / "jobs.db"), clock=clock)
    images = LocalImageStore(str(tmp_path / "images"))
    config = AppConfig.model_validate({"jobs": {"retention_s": 60}})
    jobs = Jobs(config, store, pipeline=None, images=images, worker="w")
    name = images.save(b"png", "png", "anonymous", time.time() + 3600)
    running(store, "job-old")
    result = {"images": [{"name": name, "seed": 1}], "response_format": "url"}
    store.finish("job-old", "w", "succeeded", retention_s=60, result=result)
    running(store, "job-live")

    asyncio.run(jobs.maintain())
    assert images.read(name, "anonymous") is not None and store.get("job-old") is not None
    clock.now += 61
    asyncio.run(jobs.maintain())
    assert store.get("job-old") is None and store.events("job-old") == []
    assert images.read(name, "anonymous") is None
    assert store.get("job-live").status == RUNNING  # still leased (far in the future)


def test_a_seed_is_fixed_once_and_an_idempotency_key_binds_the_body_as_sent():
    planner = Planner(AppConfig())
    req = parse_generation_request(json.dumps({"prompt": "a cat", "n": 2}).encode())
    accepted, _ = planner.accept(req)
    assert req.seed is None and accepted.seed is not None
    _, spec = planner.plan(accepted, "job-x")
    _, again = planner.plan(accepted, "job-x")
    assert spec.sampling.seeds == again.sampling.seeds == (accepted.seed, accepted.seed + 1)
    assert request_hash(req) == request_hash(parse_generation_request(json.dumps({"n": 2, "prompt": "a cat"}).encode()))
    assert request_hash(req) != request_hash(accepted)


def test_job_ids_are_random_and_checked():
    a, b = new_job_id(), new_job_id()
    assert a != b and check_job_id(a) == a
    for bad in ["", "job_", "job_" + "g" * 24, "JOB_" + "0" * 24, "job_" + "0" * 25, "../job"]:
        with pytest.raises(Exception) as info:
            check_job_id(bad)
        assert info.value.param == "job_id"


@pytest.mark.parametrize(
    "steps, partial, expected",
    [(8, 2, {3: 0, 5: 1}), (4, 3, {1: 0, 2: 1, 3: 2}), (2, 3, {1: 0}), (1, 3, {}), (50, 0, {}), (6, 2, {2: 0, 4: 1})],
)
def test_previews_are_spread_over_the_steps_before_the_last(steps, partial, expected):
    assert preview_steps(steps, partial) == expected
