"""The ingress deployment: builds one replica's API (FastAPI under `@serve.ingress`) and its
background dispatcher. Thin: routes live in `routes_images.py` and `routes_jobs.py`.

The FastAPI app is built per replica by `__serve_build_asgi_app__`, so routes close over that
replica's objects and nothing lives at module level. The dispatcher starts with the app's lifespan
and stops (releasing its leases) at Serve's graceful shutdown. No torch is imported here.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import InvalidParameter
from deployments.stage import open_store
from serve_app.asgi import DisconnectOnCancelledReceive
from serve_app.context import ApiContext, request_id_of
from serve_app.dispatcher import Dispatcher
from serve_app.errors import RouteError, error_response
from serve_app.event_hub import EventHub
from serve_app.image_store import LocalImageStore
from serve_app.jobs import Jobs
from serve_app.pipeline import Pipeline
from serve_app.routes_images import add_image_routes
from serve_app.routes_jobs import add_job_routes


def deployment_options(config) -> dict[str, Any]:
    return {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256}


def build_api(ctx: ApiContext) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.dispatcher.start()
        yield
        await ctx.dispatcher.stop()

    app = FastAPI(title="dit-serve", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(RouteError(str(exc.detail), exc.status_code), request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = str(first["loc"][-1]) if first["loc"] else None
        return error_response(InvalidParameter(first["msg"], param), request_id_of(request))

    add_image_routes(app, ctx)
    add_job_routes(app, ctx)
    app.add_middleware(DisconnectOnCancelledReceive)
    return app


@serve.deployment(name="ImagesAPI")
@serve.ingress()
class ImagesAPI:
    def __init__(self, text_encoder, denoiser, vae_decoder, config):
        store = open_store(config)
        images = LocalImageStore(config.image_store.directory)
        pipeline = Pipeline(text_encoder, denoiser, vae_decoder)
        worker = f"ingress-{secrets.token_hex(8)}"
        jobs = Jobs(config, store, pipeline, images, worker)
        self.ctx = ApiContext(
            config=config,
            pipeline=pipeline,
            jobs=jobs,
            hub=EventHub(store),
            images=images,
            dispatcher=Dispatcher(jobs),
            created=int(time.time()),
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.ctx)
