"""The ingress replica's Prometheus metrics, through `ray.serve.metrics` (exported on Ray's metrics
endpoint of each node, prefixed `ray_`, counters suffixed `_total`; see docs/observability.md).

One `ApiMetrics` per ingress replica, built in its constructor and handed to `Jobs` (reachable as
`ctx.jobs.metrics`); nothing here lives at module level, and Ray is imported only when one is
built. `RequestMetricsMiddleware` counts every HTTP request by the template of the route that
handled it (`/v1/images/jobs/{job_id}`, never the raw path: one series per route, not per job id),
its method, status code and outcome.
"""

from __future__ import annotations

import asyncio
from typing import Mapping, Sequence

from deployments.job_store.base import STATUSES

UNMATCHED = "unmatched"  # the route label of a request no route handles (404)
CLIENT_CLOSED = 499  # the status recorded when the client went away before any response (nginx's)


def route_template(routes: Sequence, scope: Mapping) -> str:
    """The path template of the route the router hands `scope` to: the first full match, else the
    first partial one (the path matches, the method does not: a 405), else `UNMATCHED`."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:
            partial = route
    return UNMATCHED if partial is None else partial.path


def outcome_of(status: int, disconnected: bool = False) -> str:
    """success (1xx-3xx), client_error (4xx), server_error (5xx), or disconnected (the client went
    away before the response ended, whatever had been sent)."""
    if disconnected:
        return "disconnected"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "success"


class ApiMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self._requests = Counter(
            "dit_serve_http_requests",
            "HTTP requests the ingress answered, by route template, method, status code and outcome.",
            tag_keys=("route", "method", "status_code", "outcome"),
        )
        self._images = Counter(
            "dit_serve_images_generated",
            "Images generated (requests that succeeded, counted per image), by request kind.",
            tag_keys=("kind",),
        )
        self._finished = Counter(
            "dit_serve_jobs_finished",
            "Requests ended by this ingress, by final status and kind (job, sync, stream).",
            tag_keys=("status", "kind"),
        )
        self._cancellations = Counter(
            "dit_serve_cancellations",
            "Requests cancelled, by where they stopped: queue (before any run), ingress (between"
            " attempts), or the stage that stopped them.",
            tag_keys=("stage",),
        )
        self._rejections = Counter(
            "dit_serve_admission_rejections",
            "Requests refused by admission control (429), by reason.",
            tag_keys=("reason",),
        )
        self._jobs = Gauge(
            "dit_serve_jobs",
            "Records in the job store by state (the whole store, as last read by this ingress's"
            " maintenance loop: take max over replicas, not the sum).",
            tag_keys=("state",),
        )

    def request(self, route: str, method: str, status: int, outcome: str) -> None:
        self._requests.inc(
            tags={"route": route, "method": method, "status_code": str(status), "outcome": outcome}
        )

    def images(self, count: int, kind: str) -> None:
        if count:
            self._images.inc(count, tags={"kind": kind})

    def finished(self, status: str, kind: str) -> None:
        self._finished.inc(tags={"status": status, "kind": kind})

    def cancelled(self, stage: str) -> None:
        self._cancellations.inc(tags={"stage": stage})

    def rejected(self, reason: str) -> None:
        """Admission refused a request (call where the 429 is decided)."""
        self._rejections.inc(tags={"reason": reason})

    def jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """The store's `counts_by_status()`: every state is set, 0 where it has none."""
        for state in dict.fromkeys((*STATUSES, *counts)):
            self._jobs.set(counts.get(state, 0), tags={"state": state})


class RequestMetricsMiddleware:
    """Pure ASGI: counts each HTTP request once it ends (`ApiMetrics.request`). Add it last so it
    is the outermost middleware and sees every answer, the 401s and error pages included. A request
    whose task is cancelled (Serve does that when the client hangs up) is `disconnected`, with
    the status already sent or 499."""

    def __init__(self, app, metrics: ApiMetrics, routes: Sequence):
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's own route list (routes added later are seen too)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_template(self.routes, scope)
        status = None

        async def noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        def count(default: int, disconnected: bool = False) -> None:
            code = default if status is None else status
            self.metrics.request(route, scope["method"], code, outcome_of(code, disconnected))

        try:
            await self.app(scope, receive, noting_status)
        except asyncio.CancelledError:
            count(CLIENT_CLOSED, disconnected=True)
            raise
        except BaseException:
            count(500)  # Starlette's outermost error middleware answers it with a 500
            raise
        count(500)
