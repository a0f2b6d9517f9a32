"""HTTP schemas: OpenAI's Images API (`POST /v1/images/generations`) plus a few extensions.

Static checks (types, fixed ranges, unknown fields) live here; limits that depend on the deployed
model (sizes, n, steps) are checked against the app config in `service.py`. Types are strict: a
number sent as a string is an error that names the field, never silently coerced.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_SEED = 2**64 - 1


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What to draw.")
    model: Optional[StrictStr] = Field(
        None, description="One of the served models (GET /v1/models); default: the first."
    )
    n: StrictInt = Field(1, ge=1, description="Images to generate for the prompt.")
    size: Optional[StrictStr] = Field(None, description="`WIDTHxHEIGHT`, e.g. `1024x1024`.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Optional[Literal["png", "jpeg", "webp"]] = None
    output_compression: Optional[StrictInt] = Field(None, ge=0, le=100)
    # Accepted for compatibility with OpenAI clients; they do not change the result.
    quality: Optional[StrictStr] = None
    style: Optional[StrictStr] = None
    user: Optional[StrictStr] = None
    # gpt-image fields, accepted where their meaning holds here: the images are always opaque
    # ("transparent" is refused by `parse_generation_request`, saying why), and this server runs
    # no content filter of its own, so both moderation levels mean the same.
    background: Optional[Literal["auto", "opaque"]] = Field(
        None, description="`auto` or `opaque` (the images have no alpha channel)."
    )
    moderation: Optional[Literal["auto", "low"]] = Field(
        None, description="Accepted and ignored: this server applies no content filter."
    )
    # Extensions.
    seed: Optional[StrictInt] = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i. Random when absent."
    )
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1)
    guidance_scale: Optional[StrictFloat] = Field(
        None,
        ge=0.0,
        description=(
            "Default: the model's. SD3 and PixArt: classifier-free guidance when > 1. FLUX.1: the"
            " distilled guidance the transformer takes as input."
        ),
    )
    negative_prompt: Optional[StrictStr] = Field(
        None,
        description=(
            "SD3 and PixArt: what to steer away from (classifier-free guidance, used when"
            " guidance_scale > 1; empty by default, as in diffusers). FLUX.1 takes none."
        ),
    )
    # Streaming (OpenAI's image streaming events); `partial_images` previews also go to job events.
    stream: Optional[StrictBool] = None
    partial_images: Optional[StrictInt] = Field(None, ge=0, le=3)
    # Admission (docs/admission.md).
    priority: Optional[StrictInt] = Field(
        None, ge=-10, le=10, description="Async jobs: higher runs sooner (0 default; see priority_boost_s)."
    )
    deadline_s: Optional[StrictFloat] = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds from acceptance after which the request ends with 504 deadline_exceeded.",
    )


class ImageData(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None
    seed: int  # extension: the seed this image was generated from


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str


class JobObject(BaseModel):
    """An async job as `GET /v1/images/jobs/{id}` shows it."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    started_at: Optional[int] = None
    finished_at: Optional[int] = None
    expires_at: Optional[int] = None
    attempts: int
    queue_position: Optional[int] = None  # queued: jobs that start before it
    progress: Optional[dict] = None  # running: {stage, state, step, steps}
    cancel_requested: bool = False
    result: Optional[ImagesResponse] = None  # succeeded: what /v1/images/generations returns
    error: Optional[dict] = None  # failed: an OpenAI error object
    status_url: str
    events_url: str


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dit-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


MAX_BODY_BYTES = 1_000_000  # also enforced while reading, for every route (asgi.BodyLimit)
MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a body; ours need 1

# Fields a `null` may stand for: OpenAI's schema marks them nullable, and null means the default.
_DEFAULTED = frozenset(n for n, f in ImageGenerationRequest.model_fields.items() if not f.is_required())
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class ErrorObject(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None
    request_id: Optional[str] = Field(None, description="5xx only: what finds it in the log.")


class ErrorResponse(BaseModel):
    """Every error body (OpenAI's shape)."""

    error: ErrorObject


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    stages: dict[str, str]


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than `limit` (brackets inside strings do not
    count). Linear and cheap, so a hostile body never reaches the recursive parser."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for c in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if c in (0x5B, 0x7B) else -1
        if depth > limit:
            return True
    return False


def check_json_content_type(content_type: Optional[str]) -> None:
    """Bodies are JSON: `application/json` (or `application/*+json`), or no Content-Type at all;
    anything else (a form, text/plain) is a 415 naming the header."""
    from serve_app.errors import UnsupportedMediaType

    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media or media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(
        f"Content-Type must be application/json, got {media!r}", "Content-Type"
    )


def parse_generation_request(body: bytes, content_type: Optional[str] = None) -> ImageGenerationRequest:
    """Raw body -> request, or an ApiError naming what is wrong (never a 422 or 500)."""
    import json

    from pydantic import ValidationError

    from deployments.errors import InvalidJson, InvalidParameter, PayloadTooLarge

    check_json_content_type(content_type)
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    too_deep = InvalidJson(f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    if json_too_deep(body):
        raise too_deep
    try:
        data = json.loads(body)
    except RecursionError:  # only if the scan above was fooled (a non-UTF-8 body, say)
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
    data = {k: v for k, v in data.items() if v is not None or k not in _DEFAULTED}
    if data.get("size") == "auto":  # OpenAI's "auto": the configured default size
        del data["size"]
    if data.get("background") == "transparent":
        raise InvalidParameter(
            "background 'transparent' is not supported: this model's images are opaque (no alpha"
            " channel); send 'auto' or 'opaque'",
            "background",
        )
    try:
        return ImageGenerationRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        messages = []
        for err in errors:
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
            messages.append(f"{where}: {msg}")
        raise InvalidParameter("; ".join(messages), param) from None
