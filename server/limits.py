"""A bounded body on every route (uploads have their own limit), so that no client can make the server hold
unbounded memory; requests in flight are bounded per tenant (server/tenancy.py)."""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError

UPLOAD_PATHS = frozenset({"/v1/adapters", "/v1/files"})  # multipart archives and training data


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
