"""Async jobs: `POST /v1/images/jobs` (202), `GET /v1/images/jobs` (a page), `GET`/`DELETE
/v1/images/jobs/{id}`, and `GET /v1/images/jobs/{id}/events` (server-sent events, resumable with
`Last-Event-ID`)."""

from __future__ import annotations

import json
import re
from typing import Literal, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from deployments.errors import Conflict, InvalidParameter
from deployments.job_store.base import IdempotencyConflict, JobEvent
from serve_app.context import ApiContext, base_url, owner_of, request_id_of
from serve_app.errors import error_response
from serve_app.jobs import check_job_id
from serve_app.protocol import JobList, parse_generation_request
from serve_app.results import images_response, job_object
from serve_app.streams import follow

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def add_job_routes(app: FastAPI, ctx: ApiContext) -> None:
    jobs = ctx.jobs

    @app.post("/v1/images/jobs")
    async def create_job(request: Request):
        rid, owner = request_id_of(request), owner_of(request)
        try:
            req = parse_generation_request(await request.body())
            if req.stream:
                raise InvalidParameter("a job streams through its events_url, not `stream`", "stream")
            key = _idempotency_key(request)
            try:
                record, created, position = await jobs.submit(req, owner, rid, key)
            except IdempotencyConflict as exc:
                raise Conflict(
                    f"Idempotency-Key was first used for job {exc.job_id} with a different body",
                    "Idempotency-Key",
                ) from None
            if created:
                ctx.dispatcher.wake()
            body = job_object(record, base_url(request), position)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, rid)
        headers = {"Location": body.status_url}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(body.model_dump(exclude_none=True), status_code=202, headers=headers)

    @app.get("/v1/images/jobs")
    async def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=100),
        after: Optional[str] = None,
        order: Literal["asc", "desc"] = "desc",
    ):
        try:
            page, has_more = await jobs.call(
                jobs.store.list_jobs,
                owner_of(request),
                limit=limit,
                after=None if after is None else check_job_id(after, "after"),
                newest_first=order == "desc",
            )
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        data = [job_object(r, base_url(request)) for r in page]
        body = JobList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.get("/v1/images/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        try:
            record = await jobs.get(job_id, owner_of(request))
            position = await jobs.call(jobs.store.queue_position, record.id)
            result = None
            if record.result:
                result = await images_response(record.result, ctx.images, ctx.image_url(request))
            body = job_object(record, base_url(request), position, result)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.delete("/v1/images/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        try:
            record = await jobs.cancel(job_id, owner_of(request), "cancelled by DELETE")
            body = job_object(record, base_url(request))
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.get("/v1/images/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, after: Optional[int] = Query(None, ge=0)):
        try:
            record = await jobs.get(job_id, owner_of(request))
            resume = _last_event_id(request, after)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        image_url = ctx.image_url(request)

        async def stream():
            async for event in follow(jobs.store, ctx.hub, record.id, resume):
                yield ServerSentEvent(
                    id=str(event.seq), event=event.type, data=json.dumps(await _render(ctx, event, image_url))
                )

        return EventSourceResponse(stream(), ping=15)


async def _render(ctx: ApiContext, event: JobEvent, image_url) -> dict:
    data = {"job_id": event.job_id, "seq": event.seq, "created_at": event.created_at}
    if event.type == "completed":  # the stored result names its images; the client gets them
        result = await images_response(event.data, ctx.images, image_url)
        data["result"] = result.model_dump(exclude_none=True)
    else:
        data.update(event.data)
    return data


def _idempotency_key(request: Request) -> Optional[str]:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
        raise InvalidParameter("Idempotency-Key must be 1-255 printable ASCII characters", "Idempotency-Key")
    return key


def _last_event_id(request: Request, after: Optional[int]) -> int:
    """Resume point: the `Last-Event-ID` header (an EventSource reconnecting), else `after`."""
    header = request.headers.get("last-event-id")
    if header is None:
        return after or 0
    if not header.isdigit():
        raise InvalidParameter("Last-Event-ID must be an event id (a non-negative integer)", "Last-Event-ID")
    return int(header)
