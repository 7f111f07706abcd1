"""Admission control: a bounded number of generation requests in flight (running or queued in the
engine); past it a request is refused at once with 429 and Retry-After instead of queueing in memory."""

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_json
from server.metrics import REJECTED
from server.protocol import ErrorBody, ErrorResponse

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
            body = ErrorResponse(error=ErrorBody(
                message=f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                type="rate_limit_error", code="over_capacity"))
            await error_json(429, body, {"Retry-After": "1"})(scope, receive, send)
            return
        self.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1
