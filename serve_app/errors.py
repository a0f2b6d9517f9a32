"""The one place where exceptions become HTTP statuses and OpenAI-style error bodies.

Client mistakes (`ApiError` subclasses) become 4xx bodies that name the bad parameter. Anything else
becomes a 5xx whose body carries only the request id; the traceback goes to the log, never the body.
The exception classes themselves live in `deployments.errors` (stages raise them; they cross Ray).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from deployments.errors import ApiError, Unavailable

logger = logging.getLogger("dit_serve")


class RouteError(ApiError):
    """Starlette's own 404/405 (no such route, wrong method), in the OpenAI error shape."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.args = (message, status)
        self.status = status
        self.code = "not_found" if status == 404 else "method_not_allowed" if status == 405 else None


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

    chain = list(_chain(exc))
    for link in chain:
        if isinstance(link, ApiError):
            return link
        if isinstance(link, (ray_exc.ActorDiedError, ray_exc.ActorUnavailableError)):
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
    """(status, body, headers) for any exception; logs server-side failures with the request id."""
    exc = classify(exc)
    headers: dict[str, str] = {}  # the Serve proxy itself echoes x-request-id
    if isinstance(exc, ApiError):
        if isinstance(exc, Unavailable):
            headers["Retry-After"] = str(exc.retry_after_s)
            logger.warning("request %s unavailable: %s", request_id, exc.message)
        return exc.status, exc.body(), headers
    logger.error("request %s failed", request_id, exc_info=exc)
    return 500, {"error": internal_error_object(request_id)}, headers


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """The HTTP response for any exception (see `error_body`)."""
    status, body, headers = error_body(exc, request_id)
    return JSONResponse(body, status_code=status, headers=headers)
