"""HTTP routes (FastAPI under `@serve.ingress`), thin: parse, call the service, shape the reply.

The FastAPI app is built per replica by `__serve_build_asgi_app__`, so routes close over that
replica's service and nothing lives at module level. No torch is imported here.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.payloads import StageTrace
from serve_app.errors import InvalidParameter, NotFound, RouteError, error_response
from serve_app.image_store import LocalImageStore
from serve_app.protocol import parse_generation_request
from serve_app.service import ImageService

REQUEST_ID_HEADER = "x-request-id"


def request_id_of(request: Request) -> str:
    """The id the Serve proxy put on the request (it echoes it back as X-Request-ID)."""
    return request.headers.get(REQUEST_ID_HEADER, "")[:128] or "unknown"


def trace_headers(trace: tuple[StageTrace, ...]) -> dict[str, str]:
    """Per-stage batch time (standard Server-Timing) and the batch size each stage ran."""
    return {
        "Server-Timing": ", ".join(f"{t.stage};dur={t.seconds * 1000:.1f}" for t in trace),
        "x-dit-batch-sizes": ",".join(f"{t.stage}={t.batch_size}" for t in trace),
    }


def build_api(service: ImageService) -> FastAPI:
    app = FastAPI(title="dit-serve", docs_url="/docs", redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(RouteError(str(exc.detail), exc.status_code), request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = str(first["loc"][-1]) if first["loc"] else None
        return error_response(InvalidParameter(first["msg"], param), request_id_of(request))

    @app.post("/v1/images/generations")
    async def generate_images(request: Request):
        rid = request_id_of(request)
        try:
            req = parse_generation_request(await request.body())
            base = service.config.image_store.public_base_url

            def image_url(name: str) -> str:
                if base:
                    return f"{base.rstrip('/')}/images/{name}"
                return str(request.url_for("get_image", name=name))

            response, trace = await service.generate(req, rid, image_url)
            return JSONResponse(response.model_dump(exclude_none=True), headers=trace_headers(trace))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a shaped error response
            return error_response(exc, rid)

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(service.models().model_dump())

    @app.get("/health")
    async def health():
        ok, detail = await service.health()
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "stages": detail},
            status_code=200 if ok else 503,
        )

    @app.get("/images/{name}", name="get_image")
    async def get_image(name: str, request: Request):
        found = service.store.lookup(name)
        if found is None:
            return error_response(NotFound(f"no image named {name!r}", "name"), request_id_of(request))
        path, media_type = found
        return FileResponse(path, media_type=media_type)

    return app


@serve.deployment(name="ImagesAPI", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class ImagesAPI:
    def __init__(self, text_encoder, denoiser, vae_decoder, config):
        store = LocalImageStore(config.image_store.directory)
        self.service = ImageService(config, text_encoder, denoiser, vae_decoder, store)

    def __serve_build_asgi_app__(self):
        return build_api(self.service)
