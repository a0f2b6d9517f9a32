"""The exceptions that cross Ray: raised (or returned per request) by stages, read by the ingress.

Plain, picklable, torch- and HTTP-free. `ApiError` subclasses are client mistakes or conditions the
client can act on; each carries its HTTP status, OpenAI error type/code and the parameter it names.
`serve_app.errors` turns any exception into the HTTP response.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with a meaning for the client: status, OpenAI error type/code, parameter."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def error_object(self) -> dict[str, Any]:
        """OpenAI's error object: what goes under "error" in a body, or in a job's `error`."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error_object()}


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


class Conflict(ApiError):
    status = 409
    code = "conflict"


class RequestCancelled(ApiError):
    """A request that was cancelled (by a DELETE of its id) while its client waited for it."""

    status = 409
    code = "request_cancelled"


class Unavailable(ApiError):
    """The service cannot take the request now; the client may retry (503 + Retry-After)."""

    status = 503
    type = "server_error"
    code = "unavailable"
    retry_after_s = 5


class StageFailure(Exception):
    """A stage failed on its side; its log has the traceback under the request id."""

    def __init__(self, stage: str, request_id: str):
        super().__init__(stage, request_id)
        self.stage = stage
        self.request_id = request_id

    def __str__(self) -> str:
        return f"stage {self.stage} failed for request {self.request_id}"


class Unauthorized(ApiError):
    """No valid API key (`Authorization: Bearer <key>`) where the app requires one."""

    status = 401
    code = "invalid_api_key"


class TooManyRequests(ApiError):
    """Over capacity or over a per-key limit: retry after `retry_after_s` (429 + Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, param: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, param)
        self.args = (message, param, retry_after_s)
        self.retry_after_s = max(1, int(-(-retry_after_s // 1)))


class RateLimited(TooManyRequests):
    code = "rate_limit_exceeded"


class DeadlineExceeded(ApiError):
    """The request's deadline (`deadline_s`, or the app's default) passed before it finished."""

    status = 504
    type = "server_error"
    code = "deadline_exceeded"


class InsufficientMemory(ApiError):
    """Even one image of the request does not fit in the device memory of the stage that runs it
    (the stage already split its batch down to single images). A 400, not a 5xx: like a size over
    `limits.max_size`, it is a property of the request against this deployment, the same request
    fails every time, and the client fixes it by asking for less (a smaller `size`); a 5xx would
    invite retries (Serve's, the client's, this app's job retries) that can never succeed and would
    page an operator for a client's choice."""

    code = "insufficient_memory"
