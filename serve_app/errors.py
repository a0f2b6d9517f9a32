"""The one place where exceptions become HTTP statuses and OpenAI-style error bodies.

Client mistakes (`ApiError` subclasses) become 4xx bodies that name the bad parameter. Anything else
becomes a 5xx whose body carries only the request id; the traceback goes to the log, never the body.
The exception classes themselves live in `deployments.errors` (stages raise them; they cross Ray).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from fastapi.responses import JSONResponse

from deployments.errors import ApiError, TooManyRequests, Unavailable

logger = logging.getLogger("dit_serve")


class RouteError(ApiError):
    """Starlette's own 404/405 (no such route, wrong method), in the OpenAI error shape."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.args = (message, status)
        self.status = status
        self.code = STATUS_CODES.get(status)


class UnsupportedMediaType(ApiError):
    """A body that is not JSON (a form, text/plain): 415 naming `Content-Type`."""

    status = 415
    code = "unsupported_media_type"


# The `code` of an error known only by its status (Starlette's and middlewares' own errors).
STATUS_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
# Plain-text errors of Starlette's middlewares -> the header they are about.
PLAIN_ERROR_PARAMS = {
    "Invalid host header": "Host",
    "Disallowed CORS origin": "Origin",
    "Disallowed CORS method": "Access-Control-Request-Method",
    "Disallowed CORS headers": "Access-Control-Request-Headers",
}


def _chain(exc: BaseException):
    """The exception and what it wraps, outermost first: Ray keeps an exception raised in another
    process as `.cause` (nested when it crossed several stages); Serve's router raises its own
    RayServeException `from` an upstream actor's death."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__


def classify(exc: BaseException) -> BaseException:
    """The error as the client should see it: an ApiError, or the innermost server failure."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    chain = list(_chain(exc))
    for link in chain:
        if isinstance(link, ApiError):
            return link
        if isinstance(link, serve_exc.BackPressureError):  # a stage's bounded queue is full
            return TooManyRequests(
                "the service is at capacity; retry later", retry_after_s=link.retry_after_s or 1
            )
        if isinstance(link, serve_exc.DeploymentUnavailableError):
            return Unavailable("a serving stage is not deployed; retry later")
        if isinstance(
            link,
            (
                ray_exc.ActorDiedError,
                ray_exc.ActorUnavailableError,
                ray_exc.ObjectLostError,
                ray_exc.NodeDiedError,
                ray_exc.WorkerCrashedError,
            ),
        ):
            return Unavailable("a serving stage restarted; retry the request")
    return chain[-1]


def internal_error_object(request_id: str) -> dict[str, Any]:
    """What a client is told of a failure on the server side: that it happened, and the id that
    finds it in the log."""
    return {
        "message": f"internal server error (request id {request_id})",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
        "request_id": request_id,
    }


def error_body(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for any exception; logs server-side failures with the request id.
    A 5xx body always carries the request id, and never more than the error's own message."""
    exc = classify(exc)
    headers: dict[str, str] = {}  # the Serve proxy itself echoes x-request-id
    if isinstance(exc, ApiError):
        if isinstance(exc, (Unavailable, TooManyRequests)):
            headers["Retry-After"] = str(exc.retry_after_s)
            logger.warning("request %s %s: %s", request_id, exc.code, exc.message)
        body = exc.body()
        if exc.status >= 500:
            body["error"]["request_id"] = request_id
        return exc.status, body, headers
    logger.error("request %s failed", request_id, exc_info=exc)
    return 500, {"error": internal_error_object(request_id)}, headers


def error_response(
    exc: BaseException, request_id: str, headers: Optional[Mapping[str, str]] = None
) -> JSONResponse:
    """The HTTP response for any exception (see `error_body`), with `headers` added."""
    status, body, own_headers = error_body(exc, request_id)
    return JSONResponse(body, status_code=status, headers={**(headers or {}), **own_headers})


def status_error_body(status: int, message: str, request_id: str) -> dict[str, Any]:
    """An OpenAI-shaped body for an error known only by its status and text (a middleware's
    plain-text answer). A 5xx keeps only its status phrase and the request id."""
    from http import HTTPStatus

    if status >= 500:
        error = internal_error_object(request_id)
        if status != 500:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "server error"
            error.update(message=f"{phrase} (request id {request_id})", code=STATUS_CODES.get(status))
        return {"error": error}
    message = message.strip()[:1000] or f"HTTP {status}"
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": PLAIN_ERROR_PARAMS.get(message),
            "code": STATUS_CODES.get(status),
        }
    }


def as_api_error(exc: BaseException) -> BaseException:
    """What FastAPI/Starlette raise themselves, as the ApiError the client should see: no route or
    wrong method (HTTPException), a path/query parameter failing its declared constraint
    (RequestValidationError, a 400 naming it, never a 422). Anything else is returned as is."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from deployments.errors import InvalidParameter

    if isinstance(exc, HTTPException):
        return RouteError(str(exc.detail), exc.status_code)
    if isinstance(exc, RequestValidationError):
        errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
        param = str(errors[0]["loc"][-1]) if errors[0]["loc"] else None
        where = [str(e["loc"][-1]) if e["loc"] else "request" for e in errors]
        message = "; ".join(f"{w}: {e['msg']}" for w, e in zip(where, errors))
        return InvalidParameter(message, param)
    return exc


def install_error_handlers(app) -> None:
    """The app's one exception handler, for Starlette's HTTPException, FastAPI's
    RequestValidationError and any other exception a route lets escape: every error any route
    answers is OpenAI-shaped, a 5xx with the request id and never a stack trace."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def handle(request, exc: Exception) -> JSONResponse:
        from serve_app.context import request_id_of  # context imports this module

        headers = getattr(exc, "headers", None) if isinstance(exc, HTTPException) else None
        return error_response(as_api_error(exc), request_id_of(request), headers)

    for cls in (Exception, HTTPException, RequestValidationError):
        app.add_exception_handler(cls, handle)
