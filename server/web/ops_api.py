"""Operations routes: liveness and readiness (open without a key) and Prometheus metrics (a metrics or admin key
where keys are configured, server/auth.py)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ops_api = APIRouter()


def _phase(request: Request) -> str:
    """loading, ready, restarting (a dead engine is being replaced), failed (loading failed, or the engine
    died for good) or stopping."""
    engine = request.app.state.engine
    if engine is not None and engine.failure is not None:
        return "failed"
    if engine is not None and engine.is_restarting:
        return "restarting"
    return request.app.state.phase


@ops_api.get("/health")
async def health(request: Request) -> JSONResponse:
    """Live: the process answers (while the model loads too); 503 once loading failed or the engine died."""
    failed = _phase(request) == "failed"
    return JSONResponse({"status": "failed" if failed else "ok"}, status_code=503 if failed else 200)


@ops_api.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready: the model is loaded, the database answers, and requests are served; 503 while loading, while
    the database is unreachable (resident adapters are still served), or after a failure."""
    phase = _phase(request)
    if phase == "ready":
        for database in set(request.app.state.databases):  # one, or the registry's and the jobs' files
            if not await database.answers():
                phase = "database_unavailable"
    return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)


@ops_api.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
