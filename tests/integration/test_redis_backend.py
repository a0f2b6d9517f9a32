"""The app on the cluster backend: job records, event logs and cancel flags in a real Redis server
(started by the tests), used by every stage and the ingress exactly as on SQLite."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import b64_image, generate, is_step, job_events, max_level_diff, submit_job
from tests.integration.conftest import TEST_ARGS

APP = "on-redis"
PREFIX = "/on-redis"


@pytest.fixture(scope="module")
def url(ray_cluster, redis_url):
    from ray import serve

    from serve_app.app import build_app

    args = {**TEST_ARGS, "jobs": {"store": {"backend": "redis", "url": redis_url, "prefix": "it"}}}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    yield ray_cluster + PREFIX
    serve.delete(APP)


def test_jobs_events_and_cancellation_through_redis(url, redis_url, reference):
    import redis

    job = submit_job(url, {"prompt": "a red kite", "size": "128x128", "seed": 61, "num_inference_steps": 5}).json()
    events = job_events(url, job["id"])
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    got = events[-1]["data"]["result"]["data"][0]["b64_json"]
    assert max_level_diff(b64_image(got), reference.image("a red kite", 61, width=128, height=128, steps=5)) == 0

    slow = submit_job(url, {"prompt": "stopped", "size": "256x256", "num_inference_steps": 50}).json()
    job_events(url, slow["id"], until=is_step(2))
    assert requests.delete(slow["status_url"], timeout=30).status_code == 200
    stopped = job_events(url, slow["id"])
    assert stopped[-1]["event"] == "cancelled" and stopped[-1]["data"]["steps_done"] < 50

    sync = generate(url, {"prompt": "a red kite", "size": "128x128", "seed": 61, "num_inference_steps": 5})
    assert sync.json()["data"][0]["b64_json"] == got
    keys = redis.Redis.from_url(redis_url, decode_responses=True).keys("it:*")
    assert any(job["id"] in k for k in keys) and all(k.startswith("it:") for k in keys)
