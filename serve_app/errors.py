"""The one place where exceptions become HTTP statuses and OpenAI-style error bodies.

Client mistakes (`ApiError` subclasses) become 4xx bodies that name the bad parameter. Anything else
becomes a 5xx whose body carries only the request id; the traceback goes to the log, never the body.
The exception classes are plain, picklable and torch-free: stages raise them and they cross Ray.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

logger = logging.getLogger("dit_serve")


class ApiError(Exception):
    """An error with a meaning for the client: status, OpenAI error type/code, parameter."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidParameter(ApiError):
    code = "invalid_parameter"


class InvalidJson(ApiError):
    code = "invalid_json"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class RouteError(ApiError):
    """Starlette's own 404/405 (no such route, wrong method), in the OpenAI error shape."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.args = (message, status)
        self.status = status
        self.code = "not_found" if status == 404 else "method_not_allowed" if status == 405 else None


class Unavailable(ApiError):
    """The service cannot take the request now; the client may retry (503 + Retry-After)."""

    status = 503
    type = "server_error"
    code = "unavailable"
    retry_after_s = 5


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


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """The HTTP response for any exception; logs server-side failures with the request id."""
    exc = classify(exc)
    headers: dict[str, str] = {}  # the Serve proxy itself echoes x-request-id
    if isinstance(exc, ApiError):
        if isinstance(exc, Unavailable):
            headers["Retry-After"] = str(exc.retry_after_s)
            logger.warning("request %s unavailable: %s", request_id, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    logger.error("request %s failed", request_id, exc_info=exc)
    body = {
        "error": {
            "message": f"internal server error (request id {request_id})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
            "request_id": request_id,
        }
    }
    return JSONResponse(body, status_code=500, headers=headers)


class StageFailure(Exception):
    """A stage failed on its side; its log has the traceback under the request id."""

    def __init__(self, stage: str, request_id: str):
        super().__init__(stage, request_id)
        self.stage = stage
        self.request_id = request_id

    def __str__(self) -> str:
        return f"stage {self.stage} failed for request {self.request_id}"
