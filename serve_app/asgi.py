"""The HTTP edge: pure ASGI middleware between Ray Serve's proxy and the routes.

Outermost first (`install_middleware`): a cancelled `receive` read as a disconnect; a request id on
every request and response, and a shaped 500 for anything a route let escape; HEAD answered as GET
without the body; plain-text errors of the layers below rewritten in OpenAI's error shape; the
allowed Host headers; CORS for the configured origins; the body size limit. No torch, no Ray at
import.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Optional

REQUEST_ID = b"x-request-id"
DISCONNECT = {"type": "http.disconnect"}
SHAPED_BODY_LIMIT = 65536  # a plain-text error body longer than this is cut before it is reshaped


def header(scope, name: bytes) -> Optional[str]:
    """A request header (`name` lowercase), or None."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_id(scope) -> str:
    return (header(scope, REQUEST_ID) or "")[:128] or "unknown"


async def _send_error(exc: BaseException, scope, receive, send) -> None:
    from serve_app.errors import error_response

    await error_response(exc, request_id(scope))(scope, receive, send)


class DisconnectOnCancelledReceive:
    """When a client goes away, Ray Serve cancels the request's `receive()` (TaskCancelledError)
    where ASGI apps expect an `http.disconnect` message; sse-starlette's disconnect listener then
    fails its task group and the replica logs an unretrieved exception for a normal hang-up. This
    turns the one into the other, so streams end the way ASGI says they do."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray.exceptions import TaskCancelledError

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        return await self.app(scope, receive_or_disconnect, send)


class RequestEdge:
    """Every request carries an id and every response says it (X-Request-ID); an exception that no
    route turned into a response becomes the shaped 500 naming that id (logged with its
    traceback), never a bare one.

    Behind Serve's proxy a request always arrives with `x-request-id` and the proxy itself echoes
    it on the response, so the id is added here only to a request that came without one (the app
    served some other way, or in-process in tests): one header, never two."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        echo = None
        if header(scope, REQUEST_ID) is None:
            echo = uuid.uuid4().hex.encode()
            scope["headers"] = [*(scope.get("headers") or ()), (REQUEST_ID, echo)]
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                if echo is not None and not any(k.lower() == REQUEST_ID for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", echo)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - answered here, logged by error_body
            if started:
                raise
            await _send_error(exc, scope, receive, send_with_id)


class HeadAsGet:
    """HEAD on every GET route: the route runs as a GET and the client gets its status and headers
    (Content-Length included) without the body. The response ends with its headers; from then on
    the route is told the client disconnected, so a stream (server-sent events) stops at once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        done = asyncio.Event()

        async def head_send(message):
            if done.is_set() or message["type"] != "http.response.start":
                return
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            done.set()

        async def head_receive():
            if done.is_set():
                return DISCONNECT
            received = asyncio.ensure_future(receive())
            finished = asyncio.ensure_future(done.wait())
            try:
                await asyncio.wait({received, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if received.done():
                return received.result()
            received.cancel()
            return DISCONNECT

        await self.app({**scope, "method": "GET"}, head_receive, head_send)


class ShapeErrors:
    """An error response that is not JSON is rewritten in OpenAI's error shape, its other headers
    kept: Starlette's middlewares answer in plain text (a Host not allowed, a refused CORS
    preflight), and so do Serve's own handlers (a full queue)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: Optional[dict] = None
        chunks: list[bytes] = []

        async def shaping_send(message):
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and not _is_json(message):
                    held = message
                    return
                return await send(message)
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            if sum(map(len, chunks)) < SHAPED_BODY_LIMIT:
                chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_shaped(held, b"".join(chunks)[:SHAPED_BODY_LIMIT], scope, send)

        await self.app(scope, receive, shaping_send)


def _is_json(start_message) -> bool:
    for key, value in start_message.get("headers", ()):
        if key.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


async def _send_shaped(start, text: bytes, scope, send) -> None:
    from serve_app.errors import status_error_body

    status = start["status"]
    body = json.dumps(status_error_body(status, text.decode("utf-8", "replace"), request_id(scope))).encode()
    drop = (b"content-type", b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in drop]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """No request body longer than `max_bytes` is read, on any route: a Content-Length over it is a
    413 at once, without reading; a body without one (chunked) or longer than its Content-Length
    said is cut at the cap, and the route reading it answers 413 (PayloadTooLarge is an ApiError);
    if the route lets it escape, it is answered here."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from deployments.errors import InvalidParameter, PayloadTooLarge

        too_large = PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
        length = header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                bad = InvalidParameter("Content-Length must be a non-negative integer", "Content-Length")
                return await _send_error(bad, scope, receive, send)
            if int(length) > self.max_bytes:
                return await _send_error(too_large, scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(too_large.message)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            if started:
                raise
            await _send_error(exc, scope, receive, send)


class Cors:
    """Starlette's CORSMiddleware for requests from an allowed origin; every other request passes
    by it untouched, so it gets no CORS header at all (a preflight from elsewhere is the route's
    405, not a 400 listing what would have been allowed)."""

    EXPOSE = (
        "X-Request-ID",
        "x-dit-job-id",
        "Retry-After",
        "Location",
        "Idempotent-Replayed",
        "Server-Timing",
        "x-dit-batch-sizes",
    )

    def __init__(self, app, allow_origins):
        from starlette.middleware.cors import CORSMiddleware

        self.app = app
        self.any_origin = "*" in allow_origins
        self.origins = frozenset(allow_origins)
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(allow_origins),
            allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(self.EXPOSE),
        )

    async def __call__(self, scope, receive, send):
        origin = header(scope, b"origin") if scope["type"] == "http" else None
        if origin is not None and (self.any_origin or origin in self.origins):
            return await self.cors(scope, receive, send)
        return await self.app(scope, receive, send)


def install_middleware(app, config) -> None:
    """The edge around the routes (and around anything added before this call, e.g. auth).
    `add_middleware` wraps what is already there, so the last added is the outermost."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from serve_app.protocol import MAX_BODY_BYTES

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    if config.cors.allow_origins:
        app.add_middleware(Cors, allow_origins=tuple(config.cors.allow_origins))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.http.allowed_hosts), www_redirect=False)
    app.add_middleware(ShapeErrors)
    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestEdge)
    app.add_middleware(DisconnectOnCancelledReceive)
