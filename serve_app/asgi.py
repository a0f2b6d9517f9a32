"""ASGI glue between Ray Serve and Starlette apps."""

from __future__ import annotations


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
