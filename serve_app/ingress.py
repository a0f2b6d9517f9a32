"""The ingress deployment: builds one replica's API (FastAPI under `@serve.ingress`) and its
background dispatcher. Thin: routes live in `routes_images.py`, `routes_jobs.py` and
`routes_status.py`; its metrics in `metrics.py`.

The FastAPI app is built per replica by `__serve_build_asgi_app__`, so routes close over that
replica's objects and nothing lives at module level. The dispatcher starts with the app's lifespan
and stops (releasing its leases) at Serve's graceful shutdown. No torch is imported here.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

from fastapi import FastAPI
from ray import serve

from deployments.stage import open_store
from serve_app.asgi import install_middleware
from serve_app.auth import AuthMiddleware, KeyRing
from serve_app.context import ApiContext
from serve_app.dispatcher import Dispatcher
from serve_app.errors import install_error_handlers
from serve_app.event_hub import EventHub
from serve_app.image_store import open_image_store
from serve_app.jobs import Jobs
from serve_app.metrics import ApiMetrics, RequestMetricsMiddleware
from serve_app.pipeline import Pipeline
from serve_app.routes_images import add_image_routes
from serve_app.routes_jobs import add_job_routes
from serve_app.openapi_docs import install_docs
from serve_app.routes_status import add_status_routes


# Connections an ingress replica holds beyond accepted generations: reads, event streams, 429s.
READ_HEADROOM = 256


def deployment_options(config) -> dict[str, Any]:
    """Every accepted request may hold a connection (admission caps them at max_pending), plus
    headroom for reads and streams; past that the proxy queues a bounded number and answers 429 +
    Retry-After itself, so a burst never waits without bound even before admission runs."""
    ongoing = config.admission.max_pending + READ_HEADROOM
    return {
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": ongoing,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
    }


def build_api(ctx: ApiContext) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.dispatcher.start()
        yield
        await ctx.dispatcher.stop()

    # docs_url=None: FastAPI's page loads Swagger UI from a CDN; install_docs serves it offline.
    app = FastAPI(title="dit-serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    install_docs(app, ctx.config)
    add_image_routes(app, ctx)
    add_job_routes(app, ctx)
    add_status_routes(app, ctx)
    app.add_middleware(AuthMiddleware, keys=ctx.keys)
    install_middleware(app, ctx.config)  # request ids, HEAD, error shape, hosts, CORS, body limit
    # Last: the outermost, so it counts every answer (the 401s included).
    app.add_middleware(RequestMetricsMiddleware, metrics=ctx.jobs.metrics, routes=app.routes)
    return app


@serve.deployment(name="ImagesAPI")
@serve.ingress()
class ImagesAPI:
    def __init__(self, chains, config):
        """`chains`: model name -> its (text encoder, denoiser, VAE decoder) handles."""
        store = open_store(config)
        images = open_image_store(config)
        pipeline = Pipeline(chains)
        worker = f"ingress-{secrets.token_hex(8)}"
        jobs = Jobs(config, store, pipeline, images, worker, ApiMetrics())
        self.ctx = ApiContext(
            config=config,
            pipeline=pipeline,
            jobs=jobs,
            hub=EventHub(store),
            images=images,
            dispatcher=Dispatcher(jobs),
            keys=KeyRing.from_config(config.auth),
            created=int(time.time()),
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.ctx)
