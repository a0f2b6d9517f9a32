"""`POST /v1/images/generations` (synchronous, or streamed as OpenAI's image streaming events),
`GET /images/{name}`, `GET /v1/models`, `GET /health`."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from deployments.errors import InvalidParameter, NotFound, RequestCancelled, Unavailable
from serve_app.context import ApiContext, owner_of, request_id_of, trace_headers
from serve_app.errors import error_body, error_response
from serve_app.protocol import ModelCard, ModelList, parse_generation_request
from serve_app.results import images_response
from serve_app.streams import follow

HEALTH_TIMEOUT_S = 10.0


def add_image_routes(app: FastAPI, ctx: ApiContext) -> None:
    @app.post("/v1/images/generations")
    async def generate_images(request: Request):
        rid, owner = request_id_of(request), owner_of(request)
        try:
            req = parse_generation_request(await request.body())
            if req.stream:
                return await _stream(ctx, req, rid, owner)
            record, task = await ctx.jobs.start_attached(req, "sync", owner, rid)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a shaped response
            return error_response(exc, rid)
        try:
            final, images, outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # this ingress lost the job's lease: another one runs it now
                return error_response(Unavailable("the request was moved; retry it"), rid)
            ctx.cancel_soon(record.id, owner, "the client disconnected")  # stop its work, let go
            raise
        except Exception as exc:  # noqa: BLE001 - the run itself failed (the job store, say)
            return error_response(exc, rid)
        if outcome.status == "cancelled":
            return error_response(RequestCancelled(f"request {record.id} was cancelled"), rid)
        if outcome.status != "succeeded":
            return error_response(outcome.exception, rid)
        body = await images_response(final.result, ctx.images, ctx.image_url(request), images.images)
        headers = {**trace_headers(images.trace), "x-dit-job-id": record.id}
        return JSONResponse(body.model_dump(exclude_none=True), headers=headers)

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(
            ModelList(data=[ModelCard(id=ctx.config.model.name, created=ctx.created)]).model_dump()
        )

    @app.get("/health")
    async def health():
        ok, detail = await _health(ctx)
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "stages": detail},
            status_code=200 if ok else 503,
        )

    @app.get("/images/{name}", name="get_image")
    async def get_image(name: str, request: Request):
        found = ctx.images.lookup(name)
        if found is None:
            return error_response(NotFound(f"no image named {name!r}", "name"), request_id_of(request))
        path, media_type = found
        return FileResponse(path, media_type=media_type)


async def _stream(ctx: ApiContext, req, rid: str, owner: str) -> EventSourceResponse:
    """OpenAI's image streaming: `image_generation.partial_image` for each preview, then one
    `image_generation.completed` per image; an `error` event if it fails. A client that
    disconnects cancels the request."""
    if req.response_format != "b64_json":
        raise InvalidParameter("streamed images come as b64_json", "response_format")
    record, task = await ctx.jobs.start_attached(req, "stream", owner, rid)

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
            result = await images_response(final.result, ctx.images, str, images.images)
            for index, image in enumerate(result.data):
                yield _sse(_completed(result, image, index))
        except asyncio.CancelledError:
            if not task.done():
                ctx.cancel_soon(record.id, owner, "the client disconnected")
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


async def _health(ctx: ApiContext) -> tuple[bool, dict]:
    """Ask every stage whether it can serve; (all ok, per-stage detail)."""

    async def probe(name: str, handle):
        try:
            await asyncio.wait_for(handle.ready.remote(), HEALTH_TIMEOUT_S)
            return name, None
        except asyncio.TimeoutError:
            return name, f"no answer within {HEALTH_TIMEOUT_S}s"
        except Exception as exc:  # noqa: BLE001 - reported as the stage's state
            return name, type(exc).__name__

    results = await asyncio.gather(*(probe(n, h) for n, h in ctx.pipeline.stages.items()))
    detail = {name: ("ok" if err is None else err) for name, err in results}
    return all(err is None for _, err in results), detail
