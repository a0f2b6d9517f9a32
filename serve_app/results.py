"""Stored records and results -> the API's objects (images as b64 or URLs, job objects)."""

from __future__ import annotations

import asyncio
import base64
from typing import Callable, Optional, Sequence

from deployments.job_store.base import QUEUED, JobRecord
from serve_app.image_store import ImageStore
from serve_app.protocol import ImageData, ImagesResponse, JobObject


async def images_response(
    result: dict,
    store: ImageStore,
    image_url: Callable[[str], str],
    owner: str,
    blobs: Optional[Sequence[bytes]] = None,
) -> ImagesResponse:
    """What /v1/images/generations returns, for a stored result of `owner`. `blobs`: the images
    in hand (a synchronous b64 response), else read back from the image store."""
    data = []
    for i, image in enumerate(result["images"]):
        name, seed = image.get("name"), image["seed"]
        if result["response_format"] == "url":
            data.append(ImageData(url=image_url(name), seed=seed))
            continue
        blob = blobs[i] if blobs is not None else None
        if blob is None and name:
            found = await asyncio.to_thread(store.read, name, owner)
            blob = None if found is None else found[0]
        b64 = None if blob is None else base64.b64encode(blob).decode("ascii")
        data.append(ImageData(b64_json=b64, seed=seed))
    return ImagesResponse(
        created=result["created"], data=data, output_format=result["output_format"], size=result["size"]
    )


def _int(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value)


def job_object(
    record: JobRecord,
    base_url: str,
    queue_position: Optional[int] = None,
    result: Optional[ImagesResponse] = None,
) -> JobObject:
    url = f"{base_url.rstrip('/')}/v1/images/jobs/{record.id}"
    return JobObject(
        id=record.id,
        status=record.status,
        created_at=int(record.created_at),
        started_at=_int(record.started_at),
        finished_at=_int(record.finished_at),
        expires_at=_int(record.expires_at),
        attempts=record.attempts,
        queue_position=queue_position if record.status == QUEUED else None,
        progress=None if record.terminal else record.progress,
        cancel_requested=record.cancel_requested,
        result=result,
        error=record.error,
        status_url=url,
        events_url=f"{url}/events",
    )
