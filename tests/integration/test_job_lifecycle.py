"""What a job lives through beyond one attempt, on an app of its own (two running jobs at most per
ingress, 3 s leases): cancelled while queued it never reaches a stage; kill -9 of a TextEncoder, a
VAEDecoder or the ingress replica under load loses no job; an app deleted and deployed again with
jobs queued and running accounts for every one of them."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.helpers import b64_image, is_step, job_events, max_level_diff, submit_job
from tests.integration.conftest import TEST_ARGS, own_store

APP = "lifecycle"
PREFIX = "/lifecycle"
BOUND_S = 60  # every accepted job must have ended this long after a fault (the bound)
JOBS = {"max_running": 2, "lease_s": 3, "maintenance_interval_s": 0.5, "retry_backoff_s": 0.5}


def args() -> dict:
    return own_store({**TEST_ARGS, "jobs": JOBS}, APP)
LONG = {"size": "512x512", "num_inference_steps": 50}
SMALL = {"size": "64x64", "num_inference_steps": 4}


def deploy():
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(args()), name=APP, route_prefix=PREFIX)


@pytest.fixture(scope="module")
def url(ray_cluster):
    from ray import serve

    deploy()
    yield ray_cluster + PREFIX
    serve.delete(APP)


@pytest.fixture(scope="module")
def store(url):
    from deployments.job_store import open_job_store

    return open_job_store("sqlite", path=args()["jobs"]["store"]["path"])


def status(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/v1/images/jobs/{job_id}", timeout=30).json()


def wait_all_ended(url: str, ids: list[str], bound_s: float) -> list[dict]:
    """Each job as it ended (its events stream closes at its terminal event), within the bound."""
    deadline = time.monotonic() + bound_s
    finals = []
    for job_id in ids:
        job_events(url, job_id, timeout=max(1.0, deadline - time.monotonic()))
        finals.append(status(url, job_id))
    assert time.monotonic() <= deadline + 1
    return finals


def test_a_job_cancelled_while_queued_never_reaches_a_stage(url):
    long = [submit_job(url, {**LONG, "prompt": f"a long one {i}", "seed": i}).json() for i in range(2)]
    for job in long:
        job_events(url, job["id"], until=lambda e: e["event"] == "dispatched")
    queued = submit_job(url, {**SMALL, "prompt": "never run", "seed": 9}).json()
    assert queued["status"] == "queued" and queued["queue_position"] == 0
    again = submit_job(url, {**SMALL, "prompt": "behind it", "seed": 10}).json()
    assert status(url, again["id"])["queue_position"] == 1

    cancelled = requests.delete(queued["status_url"], timeout=30).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert [e["event"] for e in job_events(url, queued["id"])] == ["queued", "cancelled"]
    assert status(url, again["id"])["queue_position"] == 0
    for job in long + [again]:
        requests.delete(job["status_url"], timeout=30)
    assert [e[-1]["event"] for e in (job_events(url, j["id"]) for j in long)] == ["cancelled"] * 2


def replica_pid(deployment: str) -> int:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP).ready.remote().result(timeout_s=60)["pid"]


@pytest.mark.parametrize("deployment", ["TextEncoder", "VAEDecoder"])
def test_a_stage_replica_killed_under_load_loses_no_job(url, reference, deployment):
    bodies = [{**SMALL, "prompt": f"under load {i}", "seed": 200 + i, "size": "128x128"} for i in range(8)]
    ids = [submit_job(url, b).json()["id"] for b in bodies]
    job_events(url, ids[0], until=lambda e: e["event"] == "stage")
    os.kill(replica_pid(deployment), signal.SIGKILL)
    finals = wait_all_ended(url, ids, BOUND_S)
    outcomes = {(j["status"], (j.get("error") or {}).get("code")) for j in finals}
    assert outcomes <= {("succeeded", None), ("failed", "unavailable")}, finals
    for body, job in zip(bodies, finals):
        if job["status"] == "succeeded":
            ref = reference.image(body["prompt"], body["seed"], width=128, height=128)
            assert max_level_diff(b64_image(job["result"]["data"][0]["b64_json"]), ref) <= 1
        else:
            assert "gave up after 3 attempts" in job["error"]["message"]
    print(f"{deployment} killed: attempts {[j['attempts'] for j in finals]}, statuses {[j['status'] for j in finals]}")
    assert sum(j["status"] == "succeeded" for j in finals) >= len(finals) - 1


def test_the_ingress_killed_under_load_loses_no_job(url, store):
    """kill -9 of the ingress replica holding running jobs: their leases expire and the new ingress
    (Serve restarts it) runs them again."""
    ids = [submit_job(url, {**SMALL, "prompt": f"orphan {i}", "seed": 300 + i, "num_inference_steps": 30, "size": "256x256"}).json()["id"] for i in range(3)]
    job_events(url, ids[0], until=is_step(2))
    os.kill(replica_pid_of_ingress(), signal.SIGKILL)
    killed_at = time.monotonic()
    finals = wait_all_ended_via_store(store, ids, BOUND_S)
    assert [r.status for r in finals] == ["succeeded"] * 3, [(r.status, r.error) for r in finals]
    assert finals[0].attempts >= 2
    print(f"ingress killed: jobs done {time.monotonic() - killed_at:.1f}s after; attempts {[r.attempts for r in finals]}")


def replica_pid_of_ingress() -> int:
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"ServeReplica:{APP}:ImagesAPI".encode() in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError("no ingress replica process")


def wait_all_ended_via_store(store, ids, bound_s):
    """Through the store itself: the HTTP route is down while Serve restarts the ingress."""
    deadline = time.monotonic() + bound_s
    cursor = store.tail_cursor()
    while time.monotonic() < deadline:
        records = [store.get(i) for i in ids]
        if all(r.terminal for r in records):
            return records
        _, cursor = store.tail(cursor, 1.0)
    raise AssertionError(f"not all ended within {bound_s}s: {[store.get(i).status for i in ids]}")


def test_after_a_restart_every_job_is_accounted_for(url, store, reference):
    from ray import serve

    running = [submit_job(url, {**LONG, "prompt": f"interrupted {i}", "seed": 400 + i}).json()["id"] for i in range(2)]
    queued = [submit_job(url, {**SMALL, "prompt": f"waiting {i}", "seed": 410 + i}).json()["id"] for i in range(2)]
    job_events(url, running[0], until=is_step(2))
    serve.delete(APP)
    before = {i: store.get(i) for i in running + queued}
    assert {before[i].status for i in queued} == {"queued"}
    assert before[running[0]].status == "running" and before[running[0]].lease_expires <= time.time()
    deploy()
    finals = wait_all_ended(url, running + queued, 180)
    assert [j["status"] for j in finals] == ["succeeded"] * 4, finals
    assert finals[0]["attempts"] == 2 and [j["attempts"] for j in finals[2:]] == [1, 1]
    retry = [e for e in job_events(url, running[0]) if e["event"] == "retry"]
    assert retry and retry[0]["data"]["reason"] == "its dispatcher stopped"
    for i, job in enumerate(finals[2:]):
        ref = reference.image(f"waiting {i}", 410 + i, width=64, height=64)
        assert max_level_diff(b64_image(job["result"]["data"][0]["b64_json"]), ref) <= 1
