"""Every error the API returns has one shape: ``{"error": code, "message": text}``.

Bad input is refused with a 4xx from here, never a 500: routes raise ``ApiError`` (or a
``JobError`` from the broker), and the handlers below turn FastAPI's own errors (validation,
unknown path, wrong method, unparsable body) into the same shape. Only a real bug becomes a
500 ``internal_error``, logged with its traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .jobs import BrokerUnavailable, JobError, ModelHung, QueueFull

log = logging.getLogger("softvq.api")

# Codes for errors raised by the framework itself (routing, body parsing), by HTTP status.
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    499: "client_disconnected",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """A refusal with its HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's error list -> one line: ``body.steps: Input should be ... ; ...``."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts) or "invalid request"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _job_error(request: Request, exc: JobError) -> JSONResponse:
    headers = {}
    if isinstance(exc, (QueueFull, BrokerUnavailable)):
        headers["Retry-After"] = "1"  # queues drain in well under a second per batch
    elif isinstance(exc, ModelHung):
        headers["Retry-After"] = "10"  # its process is restarting (or another worker takes over)
    if exc.status >= 500 and not isinstance(exc, BrokerUnavailable):
        log.warning("job error %s on %s: %s", exc.code, request.url.path, exc)
    message = str(exc) or exc.code.replace("_", " ")
    return error_response(exc.status, exc.code, message, headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", _describe_validation(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 400 and "parsing the body" in str(exc.detail):
        code = "invalid_json"  # FastAPI's wording for a body json.loads refused
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = getattr(request.state, "request_id", "-")
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, rid)
    return error_response(500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    from .registry import UnknownModel  # the engine's; a KeyError subclass

    async def _unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(404, "unknown_model", str(exc))

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(JobError, _job_error)
    app.add_exception_handler(UnknownModel, _unknown_model)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
