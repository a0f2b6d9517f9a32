"""What the routes of one ingress replica share, and the small helpers every route uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastapi import Request

from deployments.payloads import StageTrace
from serve_app.auth import ANONYMOUS, KeyRing, Tenant
from serve_app.config import AppConfig
from serve_app.dispatcher import Dispatcher
from serve_app.event_hub import EventHub
from serve_app.image_store import ImageStore
from serve_app.jobs import Jobs
from serve_app.pipeline import Pipeline

REQUEST_ID_HEADER = "x-request-id"


@dataclass
class ApiContext:
    config: AppConfig
    pipeline: Pipeline
    jobs: Jobs
    hub: EventHub
    images: ImageStore
    dispatcher: Dispatcher
    keys: KeyRing
    created: int

    def image_url(self, request: Request) -> Callable[[str], str]:
        base = self.config.image_store.public_base_url

        def url(name: str) -> str:
            if base:
                return f"{base.rstrip('/')}/images/{name}"
            return str(request.url_for("get_image", name=name))

        return url



def request_id_of(request: Request) -> str:
    """The id the Serve proxy put on the request (it echoes it back as X-Request-ID)."""
    return request.headers.get(REQUEST_ID_HEADER, "")[:128] or "unknown"


def tenant_of(request: Request) -> Tenant:
    """The tenant a request acts for: its API key's (AuthMiddleware put it there), or the one
    tenant of an app without keys."""
    return getattr(request.state, "tenant", None) or Tenant(ANONYMOUS)


def owner_of(request: Request) -> str:
    """The name of the tenant a request acts for: what its jobs and images are stored under."""
    return tenant_of(request).name


def base_url(request: Request) -> str:
    return str(request.base_url)


def trace_headers(trace: tuple[StageTrace, ...]) -> dict[str, str]:
    """Per-stage batch time (standard Server-Timing) and the batch size each stage ran."""
    return {
        "Server-Timing": ", ".join(f"{t.stage};dur={t.seconds * 1000:.1f}" for t in trace),
        "x-dit-batch-sizes": ",".join(f"{t.stage}={t.batch_size}" for t in trace),
    }
