"""`POST /v1/images/generations` (synchronous, or streamed as OpenAI's image streaming events),
`GET /images/{name}`, `GET /v1/models` and `/v1/models/{model}`. (`/health` and `/ready` are in routes_status.py.)"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from deployments.errors import InvalidParameter, ModelNotFound, NotFound, RequestCancelled, Unavailable
from serve_app.context import ApiContext, owner_of, request_id_of, tenant_of, trace_headers
from serve_app.errors import error_body, error_response
from serve_app.openapi_docs import (
    EVENT_STREAM,
    IMAGE_NAME_PATTERN,
    JOB_ID_PATTERN,
    error_responses,
    generation_body,
)
from serve_app.protocol import ImagesResponse, ModelCard, ModelList, parse_generation_request
from serve_app.results import images_response
from serve_app.streams import follow

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
JOB_ID_HEADER = {
    "description": "The request's record (GET /v1/images/jobs/{id}); also on errors once it exists.",
    "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
}


def add_image_routes(app: FastAPI, ctx: ApiContext) -> None:
    @app.post(
        "/v1/images/generations",
        openapi_extra=generation_body(),
        responses={
            200: {
                "model": ImagesResponse,
                "description": "The images; with `stream: true`, OpenAI's image streaming events.",
                "content": EVENT_STREAM,
                "headers": {"x-dit-job-id": JOB_ID_HEADER},
            },
            **error_responses(ctx.config, 400, 404, 409, 413, 415, 429, 503, 504),
        },
    )
    async def generate_images(request: Request):
        rid, tenant = request_id_of(request), tenant_of(request)
        try:
            req = parse_generation_request(await request.body(), request.headers.get("content-type"))
            if req.stream:
                return await _stream(ctx, req, rid, tenant)
            record, task = await ctx.jobs.start_attached(req, "sync", tenant, rid)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a shaped response
            return error_response(exc, rid)
        job = {"x-dit-job-id": record.id}  # on every answer once the request has its record
        try:
            final, images, outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # this ingress lost the job's lease: another one runs it now
                return error_response(Unavailable("the request was moved; retry it"), rid, job)
            ctx.jobs.cancel_soon(record.id, tenant.name, "the client disconnected")  # stop, let go
            raise
        except Exception as exc:  # noqa: BLE001 - the run itself failed (the job store, say)
            return error_response(exc, rid, job)
        if outcome.status == "cancelled":
            return error_response(RequestCancelled(f"request {record.id} was cancelled"), rid, job)
        if outcome.status != "succeeded":
            return error_response(outcome.exception, rid, job)
        body = await images_response(
            final.result, ctx.images, ctx.image_url(request), tenant.name, images.images
        )
        headers = {**trace_headers(images.trace), "x-dit-job-id": record.id}
        return JSONResponse(body.model_dump(exclude_none=True), headers=headers)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **error_responses(ctx.config)})
    async def list_models():
        return JSONResponse(
            ModelList(
                data=[ModelCard(id=name, created=ctx.created) for name in ctx.config.views()]
            ).model_dump()
        )

    @app.get(
        "/v1/models/{model:path}",
        responses={200: {"model": ModelCard}, **error_responses(ctx.config, 404)},
    )
    async def retrieve_model(request: Request, model: str = Path(description="A model id (may contain `/`).")):
        served = list(ctx.config.views())
        if model not in served:
            error = ModelNotFound(f"model {model!r} is not served here; available: {served}", "model")
            return error_response(error, request_id_of(request))
        return JSONResponse(ModelCard(id=model, created=ctx.created).model_dump())

    @app.get(
        "/images/{name}",
        name="get_image",
        response_class=Response,
        responses={
            200: {
                "description": "The image.",
                "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
            },
            **error_responses(ctx.config, 404),
        },
    )
    async def get_image(
        request: Request,
        name: str = Path(
            description="An image name from a `url` response; any other name is a 404.",
            json_schema_extra={"pattern": IMAGE_NAME_PATTERN},
        ),
    ):
        # Another key's image, an expired one and a name that is not one all read as missing.
        found = await asyncio.to_thread(ctx.images.read, name, owner_of(request))
        if found is None:
            return error_response(NotFound(f"no image named {name!r}", "name"), request_id_of(request))
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


async def _stream(ctx: ApiContext, req, rid: str, tenant) -> EventSourceResponse:
    """OpenAI's image streaming: `image_generation.partial_image` for each preview, then one
    `image_generation.completed` per image; an `error` event if it fails. A client that
    disconnects cancels the request."""
    if req.response_format != "b64_json":
        raise InvalidParameter("streamed images come as b64_json", "response_format")
    record, task = await ctx.jobs.start_attached(req, "stream", tenant, rid)

    async def events():
        previews = follow(ctx.jobs.store, ctx.hub, record.id)
        try:
            async for event in previews:
                if event.type == "preview":
                    yield _sse(_partial_image(event.data))
            final, images, outcome = await asyncio.shield(task)
            if outcome.status != "succeeded":
                error = outcome.exception or RequestCancelled(f"request {record.id} was cancelled")
                yield ServerSentEvent(event="error", data=json.dumps(error_body(error, rid)[1]))
                return
            result = await images_response(final.result, ctx.images, str, tenant.name, images.images)
            for index, image in enumerate(result.data):
                yield _sse(_completed(result, image, index))
        except asyncio.CancelledError:
            if not task.done():
                ctx.jobs.cancel_soon(record.id, tenant.name, "the client disconnected")
            raise
        finally:
            await previews.aclose()

    return EventSourceResponse(events(), ping=15, headers={"x-dit-job-id": record.id})


def _sse(data: dict) -> ServerSentEvent:
    return ServerSentEvent(event=data["type"], data=json.dumps(data))


def _partial_image(preview: dict) -> dict:
    return {
        "type": "image_generation.partial_image",
        "b64_json": preview["b64_json"],
        "created_at": int(time.time()),
        "size": preview["size"],
        "quality": "auto",
        "background": "opaque",
        "output_format": preview["output_format"],
        "partial_image_index": preview["index"],
    }


def _completed(result, image, index: int) -> dict:
    return {
        "type": "image_generation.completed",
        "b64_json": image.b64_json,
        "created_at": result.created,
        "size": result.size,
        "quality": "auto",
        "background": "opaque",
        "output_format": result.output_format,
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        },
        "index": index,  # extension: which image of the request (n > 1)
        "seed": image.seed,  # extension
    }
