"""The typed OpenAPI document (`/openapi.json`) and the offline API docs page (`/docs`).

Routes keep their own strict body parsing (`protocol.parse_generation_request`: a 400 naming the
field, never FastAPI's 422), so FastAPI cannot see their bodies; `generation_body` documents the real
one (ImageGenerationRequest, with this deployment's limits as its bounds) through `openapi_extra`,
and `error_responses` the OpenAI error body of each status a route can answer. `install_docs` then
completes the document (X-Request-ID on every response; no 422, which nothing answers) and serves
Swagger UI from the files the pinned `fastapi-swagger` package ships: the page needs no network.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI, Request

from serve_app.image_store import NAME_RE
from serve_app.jobs import JOB_ID_RE
from serve_app.protocol import ErrorResponse, ImageGenerationRequest

REQUEST_SCHEMA = "ImageGenerationRequest"
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
JOB_ID_PATTERN = JOB_ID_RE.pattern
IMAGE_NAME_PATTERN = f"^{NAME_RE.pattern}$"
EVENT_ID_PATTERN = r"^[0-9]{1,18}$"
MAX_EVENT_ID = 10**18 - 1
DOCS_ASSETS = {  # what /docs/static/ serves: fastapi-swagger's copy of Swagger UI 5
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

ERROR_DESCRIPTIONS = {
    400: "A client mistake; `error.param` names the parameter (or header) at fault.",
    401: "No valid API key (`Authorization: Bearer <key>`).",
    404: "No such model, job or image; `error.param` names which.",
    409: "A conflict: an Idempotency-Key reused with another body, or the request was cancelled.",
    413: "The request body is over the size limit.",
    415: "The body is not JSON (`Content-Type` must be application/json).",
    429: "Over capacity or over a rate limit: retry after `Retry-After` seconds.",
    500: "A failure on the server side; the body holds only the request id.",
    503: "The service cannot take the request now (a stage restarting): retry, see `Retry-After`.",
    504: "The request's deadline passed before it finished.",
}
# A text/event-stream response, one server-sent event at a time (as FastAPI documents its own).
EVENT_STREAM = {
    "text/event-stream": {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {"type": "string", "contentMediaType": "application/json"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer", "minimum": 0},
            },
        }
    }
}
RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 0}}


def error_responses(config, *statuses: int) -> dict[int, dict[str, Any]]:
    """`responses=` entries for these error statuses (plus 500 always, 401 when the app requires
    API keys), each with the OpenAI error body."""
    wanted = set(statuses) | {500}
    if config.auth.enabled:
        wanted.add(401)
    out: dict[int, dict[str, Any]] = {}
    for status in sorted(wanted):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": {**RETRY_AFTER, "required": status == 429}}
        out[status] = entry
    return out


def generation_body(extra_parameters: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """`openapi_extra=` for a route that parses an ImageGenerationRequest body itself."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{REQUEST_SCHEMA}"}}},
        }
    }
    if extra_parameters:
        extra["parameters"] = list(extra_parameters)
    return extra


def header_parameter(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


def generation_request_schema(config) -> dict[str, Any]:
    """ImageGenerationRequest's JSON schema with this deployment's limits as bounds, and every
    optional field nullable (null means its default, as in OpenAI's schema). With several models
    the bounds are the default (first) model's; each model checks its own."""
    views = config.views()
    if len(views) > 1:
        props_note = f" Models: {', '.join(views)}; the bounds shown are {next(iter(views))}'s."
    else:
        props_note = ""
    config = next(iter(views.values()))
    schema = copy.deepcopy(ImageGenerationRequest.model_json_schema())
    props, lim = schema["properties"], config.limits
    required = set(schema.get("required", ()))
    for name in list(props):
        if name not in required:
            props[name] = _nullable(props[name])
    _bound(props["prompt"], minLength=1, maxLength=lim.max_prompt_chars)
    _bound(props["n"], maximum=lim.max_n)
    _bound(props["num_inference_steps"], maximum=lim.max_steps)
    _bound(props["guidance_scale"], maximum=lim.max_guidance_scale)
    _bound(props["size"], pattern=SIZE_PATTERN)
    props["size"]["description"] = (
        f"`WIDTHxHEIGHT`, each a multiple of {config.size_multiple} between {lim.min_size} and"
        f" {lim.max_size} (heights a multiple of {config.height_multiple}); `auto` or absent:"
        f" {config.defaults.size}."
    )
    props["background"]["description"] += " `transparent` is refused with a 400."
    props["model"]["description"] += props_note
    return schema


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    if any(branch.get("type") == "null" for branch in prop.get("anyOf", ())):
        return prop
    outer = {k: prop[k] for k in ("title", "description", "default") if k in prop}
    inner = {k: v for k, v in prop.items() if k not in outer}
    return {"anyOf": [inner, {"type": "null"}], **outer}


def _bound(prop: dict[str, Any], **constraints: Any) -> None:
    """Add constraints to the non-null branch of a (possibly nullable) property."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    branches[0].update(constraints)


def _complete(schema: dict[str, Any], config) -> None:
    """What FastAPI cannot know: the request schema our routes parse themselves, the X-Request-ID
    every response carries, and no 422 (a failed parameter check is a 400 here)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[REQUEST_SCHEMA] = generation_request_schema(config)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    request_id = {
        "description": "The request's id (the one a 5xx body names; logs carry it).",
        "required": True,
        "schema": {"type": "string"},
    }
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for response in responses.values():
                response.setdefault("headers", {})["X-Request-ID"] = request_id


def install_docs(app, config) -> None:
    """A typed `/openapi.json` and `/docs` (Swagger UI) with its assets under `/docs/static/`.
    The app must be built with `docs_url=None` (FastAPI's page loads Swagger UI from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import Response

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            _complete(FastAPI.openapi(app), config)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/static/favicon-32x32.png",
        )

    @app.get("/docs/static/{asset}", include_in_schema=False)
    async def swagger_asset(asset: str, request: Request):
        from deployments.errors import NotFound
        from serve_app.errors import error_response

        if asset not in DOCS_ASSETS:
            return error_response(NotFound(f"no docs asset named {asset!r}", "asset"), _rid(request))
        return Response(
            _asset_bytes(asset),
            media_type=DOCS_ASSETS[asset],
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.docs_url = "/docs"  # what Serve reports as the app's docs path


def _rid(request) -> str:
    from serve_app.context import request_id_of

    return request_id_of(request)


def _asset_bytes(asset: str) -> bytes:
    from importlib import resources

    return (resources.files("fastapi_swagger") / "resources" / asset).read_bytes()
