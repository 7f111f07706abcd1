"""Admission control, so that no client can make the server hold unbounded memory: a bounded number
of generation requests in flight (running or queued in the engine), past which a request is refused at
once with 429 and Retry-After; and a bounded body on every route (uploads have their own limit)."""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.metrics import REJECTED

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
UPLOAD_PATHS = frozenset({"/v1/adapters", "/v1/files"})  # multipart archives and training data


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
    """Refuses a body over its route's limit with 413, by Content-Length or while reading (chunked).
    Upload routes take --max-upload-mb; every other route --max-request-mb, whatever content type the
    client claims (a multipart body sent to a JSON route gets the JSON limit)."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS
        limit = self.upload_limit if is_upload else self.limit
        message = f"request body over the limit of {limit} bytes"
        declared = Headers(scope=scope).get("content-length", "0")
        if not declared.isdigit():
            await APIError(400, "malformed Content-Length header").response()(scope, receive, send)
            return
        if int(declared) > limit:
            await APIError(413, message, param="file" if is_upload else None).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:  # a chunked body declares no length: count what arrives
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > limit:
                raise HTTPException(413, message)  # the app's error handlers turn it into error JSON
            return message_in

        await self.app(scope, counted, send)
