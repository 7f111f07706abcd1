"""What route handlers take from the running app: the router, the settings, the job runner."""

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
    if router.engine.failure is not None:
        raise APIError(503, f"the engine is down ({router.engine.failure}); this server must be restarted",
                       type="server_error", code="engine_failed")
    if router.engine.is_restarting:
        raise APIError(503, "the engine failed and is being restarted; retry shortly", type="server_error",
                       code="engine_restarting", headers={"Retry-After": "10"})
    return router


def get_tenant(request: Request) -> str:
    """Who sent it: its key's tenant (server/auth.py); one tenant, "", when the server has no keys."""
    return getattr(request.state, "tenant", "")


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_runner(request: Request) -> JobRunner:
    get_router(request)  # the runner starts once the model is loaded: until then, the same 503
    return request.app.state.jobs
