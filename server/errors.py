"""OpenAI-style error bodies for every failure a client can cause, so bad input is never a 500."""

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.base import (AdapterBusy, AdapterCapacityError, AdapterError, AdapterGone, AdapterLimit,
                           AdapterLoadError)
from adapters.registry import AdapterExists
from server.database import DatabaseUnavailable
from server.engine.base import ConstraintFailed, InexactMerge
from server.web.protocol import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.headers = status_code, headers
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))

    def response(self) -> JSONResponse:
        return error_json(self.status_code, self.body, self.headers)


def error_json(status_code: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content=body.model_dump(), headers=headers)


def adapter_api_error(exc: AdapterError) -> APIError:
    """A bad adapter is the client's 400; one gone since the request named it 404; a taken name, a swap
    that would wait too long or a merge this server would not keep exact 409; a stored adapter that no
    longer loads 500; a full device 503 (retry)."""
    if isinstance(exc, AdapterGone):  # the field that named it: the request's model, an alias's target
        message = f"The model does not exist: {exc}" if exc.field == "model" else str(exc)
        return APIError(404, message, param=exc.field, code="model_not_found", type="not_found_error")
    if isinstance(exc, AdapterLoadError):
        return APIError(500, str(exc), param=exc.field, code="adapter_load_failed", type="server_error")
    status = 409 if isinstance(exc, AdapterExists | AdapterBusy | AdapterLimit | InexactMerge) \
        else 503 if isinstance(exc, AdapterCapacityError) else 400
    code = ("invalid_constraint" if isinstance(exc, ConstraintFailed) else "invalid_adapter") if status == 400 \
        else "merge_inexact" if isinstance(exc, InexactMerge) else None
    return APIError(status, str(exc), param=exc.field, code=code,
                    type="server_error" if status == 503 else "invalid_request_error")


# What pydantic puts into an error's path for the member of a union that failed (`constrained-int`,
# `literal['auto']`, a model's class name): not a field of the request.
_UNION_MEMBER = re.compile(r"(constrained-)?(int|float|str|bool|bytes)|(literal|list|dict|function-\w+)\[.*|[A-Z]\w*")


def invalid_request(errors: list[dict]) -> APIError:
    """The first of pydantic's validation errors as a 400 naming the field."""
    first = errors[0]
    param = ".".join(str(part) for part in first.get("loc", ())
                     if part != "body" and not (isinstance(part, str) and _UNION_MEMBER.fullmatch(part))) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(AdapterError)
    async def _adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        error = adapter_api_error(exc)
        retry = {"Retry-After": "1"} if error.status_code == 503 else None
        return error_json(error.status_code, error.body, retry)

    @app.exception_handler(DatabaseUnavailable)
    async def _database_down(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        log.warning("%s", exc)  # the URL's password is hidden; the client is told no more than the fact
        body = ErrorResponse(error=ErrorBody(message="the database is unavailable; retry shortly",
                                             type="server_error", code="database_unavailable"))
        return error_json(503, body, {"Retry-After": "2"})

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request(exc.errors())
        return error_json(error.status_code, error.body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_json(exc.status_code, ErrorResponse(error=ErrorBody(message=str(exc.detail), type=kind)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_json(500, ErrorResponse(error=ErrorBody(message="internal server error", type="server_error")))
