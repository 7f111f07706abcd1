"""What route handlers take from the running app: the router, the settings, the job runner, upload checks."""

from fastapi import Request

from server.errors import APIError
from server.job_runner import JobRunner
from server.router import Router
from server.settings import ServeSettings


def get_router(request: Request) -> Router:
    router = request.app.state.router
    if router is None:
        raise APIError(503, "the model is still loading; retry shortly (GET /ready says when)",
                       type="server_error", code="loading", headers={"Retry-After": "5"})
    return router


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_runner(request: Request) -> JobRunner:
    get_router(request)  # the runner starts once the model is loaded: until then, the same 503
    return request.app.state.jobs


def check_upload_size(request: Request, limit: int) -> None:
    """Refuse an upload by its declared size before reading a byte of it."""
    length = request.headers.get("content-length")
    if length is None:
        raise APIError(411, "uploads need a Content-Length header")
    if int(length) > limit:
        raise APIError(413, f"upload of {length} bytes exceeds the limit of {limit}", param="file")
