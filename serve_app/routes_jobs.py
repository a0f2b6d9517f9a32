"""Async jobs: `POST /v1/images/jobs` (202), `GET /v1/images/jobs` (a page), `GET`/`DELETE
/v1/images/jobs/{id}`, and `GET /v1/images/jobs/{id}/events` (server-sent events, resumable with
`Last-Event-ID`)."""

from __future__ import annotations

import json
import re
from typing import Literal, Optional

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from deployments.errors import Conflict, InvalidParameter
from deployments.job_store.base import IdempotencyConflict, JobEvent
from serve_app.context import ApiContext, base_url, owner_of, request_id_of, tenant_of
from serve_app.errors import error_response
from serve_app.jobs import check_job_id
from serve_app.openapi_docs import (
    EVENT_ID_PATTERN,
    EVENT_STREAM,
    JOB_ID_PATTERN,
    MAX_EVENT_ID,
    error_responses,
    generation_body,
    header_parameter,
)
from serve_app.protocol import JobList, JobObject, parse_generation_request
from serve_app.results import images_response, job_object
from serve_app.streams import follow

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
EVENT_ID_RE = re.compile(EVENT_ID_PATTERN)
IDEMPOTENCY_KEY_PARAM = header_parameter(
    "Idempotency-Key", IDEMPOTENCY_KEY_RE.pattern, "A retried POST with the same key gets the same job back."
)
LAST_EVENT_ID_PARAM = header_parameter(
    "Last-Event-ID", EVENT_ID_PATTERN, "Resume after this event id (what EventSource sends on reconnecting)."
)


def add_job_routes(app: FastAPI, ctx: ApiContext) -> None:
    jobs = ctx.jobs

    @app.post(
        "/v1/images/jobs",
        status_code=202,
        openapi_extra=generation_body((IDEMPOTENCY_KEY_PARAM,)),
        responses={
            202: {
                "model": JobObject,
                "description": "Accepted: the job, queued (or the first one, for a replayed Idempotency-Key).",
                "headers": {
                    "Location": {"description": "The job's status_url.", "required": True, "schema": {"type": "string"}},
                    "Idempotent-Replayed": {"description": "`true` on a replay.", "schema": {"type": "string"}},
                },
            },
            **error_responses(ctx.config, 400, 404, 409, 413, 415, 429, 503),
        },
    )
    async def create_job(request: Request):
        rid, tenant = request_id_of(request), tenant_of(request)
        try:
            req = parse_generation_request(await request.body(), request.headers.get("content-type"))
            if req.stream:
                raise InvalidParameter("a job streams through its events_url, not `stream`", "stream")
            key = _idempotency_key(request)
            try:
                record, created, position = await jobs.submit(req, tenant, rid, key)
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

    @app.get("/v1/images/jobs", responses={200: {"model": JobList}, **error_responses(ctx.config, 400, 503)})
    async def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=100),
        after: Optional[str] = Query(
            None, description="A job id: the page starts after it.", json_schema_extra={"pattern": JOB_ID_PATTERN}
        ),
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

    @app.get("/v1/images/jobs/{job_id}", responses={200: {"model": JobObject}, **error_responses(ctx.config, 400, 404, 503)})
    async def get_job(request: Request, job_id: str = _job_id_path()):
        try:
            record = await jobs.get(job_id, owner_of(request))
            position = await jobs.call(jobs.store.queue_position, record.id)
            result = None
            if record.result:
                result = await images_response(record.result, ctx.images, ctx.image_url(request), record.owner)
            body = job_object(record, base_url(request), position, result)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.delete(
        "/v1/images/jobs/{job_id}",
        responses={200: {"model": JobObject}, **error_responses(ctx.config, 400, 404, 409, 503)},
    )
    async def cancel_job(request: Request, job_id: str = _job_id_path()):
        try:
            record = await jobs.cancel(job_id, owner_of(request), "cancelled by DELETE")
            body = job_object(record, base_url(request))
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.get(
        "/v1/images/jobs/{job_id}/events",
        response_class=Response,
        openapi_extra={"parameters": [LAST_EVENT_ID_PARAM]},
        responses={
            200: {
                "description": "Server-sent events until the job ends (see docs/request-lifecycle.md).",
                "content": EVENT_STREAM,
            },
            **error_responses(ctx.config, 400, 404, 503),
        },
    )
    async def job_events(
        request: Request,
        job_id: str = _job_id_path(),
        after: Optional[int] = Query(None, ge=0, le=MAX_EVENT_ID, description="Resume after this event id."),
    ):
        try:
            record = await jobs.get(job_id, owner_of(request))
            resume = _last_event_id(request, after)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, request_id_of(request))
        image_url = ctx.image_url(request)

        async def stream():
            async for event in follow(jobs.store, ctx.hub, record.id, resume):
                data = await _render(ctx, event, image_url, record.owner)
                yield ServerSentEvent(id=str(event.seq), event=event.type, data=json.dumps(data))

        return EventSourceResponse(stream(), ping=15)


async def _render(ctx: ApiContext, event: JobEvent, image_url, owner: str) -> dict:
    data = {"job_id": event.job_id, "seq": event.seq, "created_at": event.created_at}
    if event.type == "completed":  # the stored result names its images; the client gets them
        result = await images_response(event.data, ctx.images, image_url, owner)
        data["result"] = result.model_dump(exclude_none=True)
    else:
        data.update(event.data)
    return data


def _job_id_path():
    return Path(description="A job id.", json_schema_extra={"pattern": JOB_ID_PATTERN})


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
    if not EVENT_ID_RE.match(header):
        raise InvalidParameter("Last-Event-ID must be an event id (a non-negative integer)", "Last-Event-ID")
    return int(header)
