"""Metrics without Ray: which route a request is counted under, how its outcome is named, what
the ASGI middleware records for answers, errors and hang-ups, the stage queue-depth count, and the
job outcomes `Jobs` reports (cancelled in the queue, jobs by state from the store). The export
itself (Ray's metrics endpoint) is tested in tests/integration/test_observability.py."""

from __future__ import annotations

import asyncio
import types

import pytest
from fastapi import FastAPI

from deployments.job_store import open_job_store
from deployments.job_store.base import QUEUED, RUNNING, JobRecord
from deployments.metrics import StageMetrics, queue_wait
from serve_app.config import AppConfig
from serve_app.image_store import open_image_store
from serve_app.jobs import Jobs, new_job_id
from serve_app.metrics import (
    CLIENT_CLOSED,
    UNMATCHED,
    ApiMetrics,
    RequestMetricsMiddleware,
    outcome_of,
    route_template,
)
from serve_app.routes_images import add_image_routes
from serve_app.routes_jobs import add_job_routes
from serve_app.routes_status import add_status_routes


class Recorded(ApiMetrics):
    """The real metrics, and a note of every call (the exported values need Ray to read back)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def request(self, route, method, status, outcome):
        self.calls.append(("request", route, method, status, outcome))
        super().request(route, method, status, outcome)

    def cancelled(self, stage):
        self.calls.append(("cancelled", stage))
        super().cancelled(stage)

    def jobs_by_state(self, counts):
        self.calls.append(("jobs", dict(counts)))
        super().jobs_by_state(counts)


@pytest.fixture(scope="module")
def routes():
    """The app's real route table (the routes only close over the context; none is called)."""
    app = FastAPI()
    ctx = types.SimpleNamespace(jobs=None, config=AppConfig())
    add_image_routes(app, ctx)
    add_job_routes(app, ctx)
    add_status_routes(app, ctx)
    return app.routes


def http(method: str, path: str) -> dict:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "query_string": b""}


@pytest.mark.parametrize(
    "method, path, template",
    [
        ("POST", "/v1/images/generations", "/v1/images/generations"),
        ("GET", "/v1/images/jobs", "/v1/images/jobs"),
        ("GET", "/v1/images/jobs/job_0123456789abcdef01234567", "/v1/images/jobs/{job_id}"),
        ("DELETE", "/v1/images/jobs/job_fedcba9876543210fedcba98", "/v1/images/jobs/{job_id}"),
        ("GET", "/v1/images/jobs/not-a-job-id/events", "/v1/images/jobs/{job_id}/events"),
        ("GET", "/images/abc123.png", "/images/{name}"),
        ("GET", "/health", "/health"),
        ("GET", "/ready", "/ready"),
        ("GET", "/v1/status", "/v1/status"),
        ("PUT", "/v1/images/generations", "/v1/images/generations"),  # 405: the path's route
        ("GET", "/v1/images/jobs/a/b/c", UNMATCHED),
        ("GET", "/etc/passwd", UNMATCHED),
    ],
)
def test_a_request_is_labelled_by_its_route_template_never_its_raw_path(routes, method, path, template):
    assert route_template(routes, http(method, path)) == template


@pytest.mark.parametrize(
    "status, disconnected, outcome",
    [
        (200, False, "success"),
        (202, False, "success"),
        (304, False, "success"),
        (400, False, "client_error"),
        (404, False, "client_error"),
        (429, False, "client_error"),
        (500, False, "server_error"),
        (503, False, "server_error"),
        (200, True, "disconnected"),
        (CLIENT_CLOSED, True, "disconnected"),
    ],
)
def test_outcomes(status, disconnected, outcome):
    assert outcome_of(status, disconnected) == outcome


async def _drive(app, scope) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_the_middleware_counts_each_answer_once_with_its_template_status_and_outcome(routes):
    metrics = Recorded()

    async def answer(scope, receive, send):
        status = 404 if scope["path"].endswith("missing") else 202
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = RequestMetricsMiddleware(answer, metrics, routes)
    asyncio.run(_drive(app, http("POST", "/v1/images/jobs")))
    asyncio.run(_drive(app, http("GET", "/v1/images/jobs/job_missing")))
    sent = asyncio.run(_drive(app, http("GET", "/no/such/route/missing")))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # passed on
    assert metrics.calls == [
        ("request", "/v1/images/jobs", "POST", 202, "success"),
        ("request", "/v1/images/jobs/{job_id}", "GET", 404, "client_error"),
        ("request", UNMATCHED, "GET", 404, "client_error"),
    ]


def test_the_middleware_counts_failures_and_hang_ups_and_lets_them_through(routes):
    metrics = Recorded()

    async def fails(scope, receive, send):
        raise RuntimeError("boom")

    async def hung_up_before(scope, receive, send):
        raise asyncio.CancelledError()

    async def hung_up_during(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise asyncio.CancelledError()

    with pytest.raises(RuntimeError):
        asyncio.run(_drive(RequestMetricsMiddleware(fails, metrics, routes), http("GET", "/v1/status")))
    for app in (hung_up_before, hung_up_during):
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(
                _drive(RequestMetricsMiddleware(app, metrics, routes), http("POST", "/v1/images/generations"))
            )
    lifespan = {"type": "lifespan"}

    async def lifespan_app(scope, receive, send):
        return None

    asyncio.run(RequestMetricsMiddleware(lifespan_app, metrics, routes)(lifespan, None, None))
    assert metrics.calls == [
        ("request", "/v1/status", "GET", 500, "server_error"),
        ("request", "/v1/images/generations", "POST", CLIENT_CLOSED, "disconnected"),
        ("request", "/v1/images/generations", "POST", 200, "disconnected"),
    ]


def test_queue_depth_counts_requests_in_a_replica_until_they_leave_however_they_leave():
    metrics = StageMetrics("text_encoder")
    with metrics.in_stage():
        with metrics.in_stage():
            assert metrics.depth == 2
        with pytest.raises(ValueError):
            with metrics.in_stage():
                assert metrics.depth == 2
                raise ValueError("a failed batch")
        assert metrics.depth == 1
    assert metrics.depth == 0
    metrics.batch(3, 0.25)
    metrics.waited(100.0, 100.5)
    metrics.step(4, 0.01)


def test_queue_wait_is_never_negative_across_skewed_clocks():
    assert queue_wait(100.0, 100.75) == 0.75
    assert queue_wait(100.5, 100.0) == 0.0


@pytest.fixture()
def jobs(tmp_path):
    store = open_job_store("sqlite", path=str(tmp_path / "jobs.db"))
    config = AppConfig.model_validate({"image_store": {"directory": str(tmp_path / "images")}})
    return Jobs(config, store, pipeline=None, images=open_image_store(config), worker="w", metrics=Recorded())


def test_a_job_cancelled_in_the_queue_is_counted_once_there_and_a_running_one_is_left_to_its_run(jobs):
    queued, running = new_job_id(), new_job_id()
    jobs.store.create(JobRecord(queued, "job", "anonymous", {}, status=QUEUED))
    jobs.store.create(
        JobRecord(running, "job", "anonymous", {}, status=RUNNING, lease_owner="w", lease_expires=1e12)
    )
    asyncio.run(jobs.cancel(queued, "anonymous", "test"))
    asyncio.run(jobs.cancel(queued, "anonymous", "test"))  # already cancelled: not again
    asyncio.run(jobs.cancel(running, "anonymous", "test"))  # its attempt ends it (and counts it)
    assert jobs.metrics.calls == [("cancelled", "queue")]


def test_maintenance_sets_jobs_by_state_from_the_store(jobs):
    for _ in range(2):
        jobs.store.create(JobRecord(new_job_id(), "job", "anonymous", {}, status=QUEUED))
    jobs.store.create(
        JobRecord(new_job_id(), "job", "anonymous", {}, status=RUNNING, lease_owner="w", lease_expires=1e12)
    )
    asyncio.run(jobs.maintain())
    assert [c for c in jobs.metrics.calls if c[0] == "jobs"] == [("jobs", {QUEUED: 2, RUNNING: 1})]
