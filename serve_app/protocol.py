"""HTTP schemas: OpenAI's Images API (`POST /v1/images/generations`) plus a few extensions.

Static checks (types, fixed ranges, unknown fields) live here; limits that depend on the deployed
model (sizes, n, steps) are checked against the app config in `service.py`. Types are strict: a
number sent as a string is an error that names the field, never silently coerced.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_SEED = 2**64 - 1


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What to draw.")
    model: Optional[StrictStr] = Field(None, description="Must name the served model if given.")
    n: StrictInt = Field(1, ge=1, description="Images to generate for the prompt.")
    size: Optional[StrictStr] = Field(None, description="`WIDTHxHEIGHT`, e.g. `1024x1024`.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Optional[Literal["png", "jpeg", "webp"]] = None
    output_compression: Optional[StrictInt] = Field(None, ge=0, le=100)
    # Accepted for compatibility with OpenAI clients; they do not change the result.
    quality: Optional[StrictStr] = None
    style: Optional[StrictStr] = None
    user: Optional[StrictStr] = None
    # Extensions.
    seed: Optional[StrictInt] = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i. Random when absent."
    )
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1)
    guidance_scale: Optional[StrictFloat] = Field(None, ge=0.0)
    # Streaming (OpenAI's image streaming events); `partial_images` previews also go to job events.
    stream: Optional[StrictBool] = None
    partial_images: Optional[StrictInt] = Field(None, ge=0, le=3)


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


MAX_BODY_BYTES = 1_000_000


def parse_generation_request(body: bytes) -> ImageGenerationRequest:
    """Raw body -> request, or an ApiError naming what is wrong (never a 422 or 500)."""
    import json

    from pydantic import ValidationError

    from deployments.errors import InvalidJson, InvalidParameter, PayloadTooLarge

    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
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
