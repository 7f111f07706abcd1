"""Admission control, so that no client can make the server hold unbounded memory: a bounded number
of generation requests in flight (running or queued in the engine), past which a request is refused at
once with 429 and Retry-After; and a bounded JSON body (archives have their own upload limit)."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.metrics import REJECTED

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class InFlightLimit:
    """Pure ASGI, so a streamed response counts until its last byte is sent or its client leaves."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit
        self.num_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.num_in_flight >= self.limit:
            REJECTED.labels("over_capacity").inc()
            refused = APIError(429, f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                               type="rate_limit_error", code="over_capacity", headers={"Retry-After": "1"})
            await refused.response()(scope, receive, send)
            return
        self.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1


class BodyLimit:
    """Refuses non-multipart bodies over `limit` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        if scope["type"] != "http" or headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.limit} bytes"
        if int(headers.get(b"content-length", b"0") or 0) > self.limit:
            await APIError(413, message).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:  # a chunked body declares no length: count what arrives
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)  # the app's error handlers turn it into error JSON
            return message_in

        await self.app(scope, counted, send)
