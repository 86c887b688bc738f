"""Errors over HTTP: ONE table from error class to status, and the one body shape.

Every error the server answers, whatever raised it (an operation, the body parser, the
router, a node's credentials), has the body

    {"error": {"code": "<snake_case>", "message": "<human sentence>", ...}}

FastAPI's default `{"detail": ...}` never appears. A 5xx says nothing about its cause (the
cause is logged); messages of 4xx errors come from state.errors, which never carry a
password, sync key or token.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailstate.state.errors import (
    CompileError,
    Conflict,
    Forbidden,
    InvalidInput,
    MailstateError,
    NotFound,
    StateInvalid,
    StoreError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("mailstate.http")

# One table: error class → HTTP status (most specific first, like httpx's exception map).
STATUS: list[tuple[type[MailstateError], int]] = [
    (InvalidInput, 400),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (StateInvalid, 422),
    (Unavailable, 503),
    (StoreError, 500),
    (CompileError, 500),
    (MailstateError, 500),
]

INTERNAL_MESSAGE = "The server could not complete the request; the cause has been logged."

# Statuses the router itself answers (unknown path, wrong method, ...) → our codes.
_ROUTER_CODES = {
    400: ("bad_request", "The request is malformed."),
    401: ("unauthenticated", "A valid bearer token is required."),
    403: ("forbidden", "This request is not allowed."),
    404: ("not_found", "There is no such endpoint."),
    405: ("method_not_allowed", "This endpoint does not accept that HTTP method."),
    406: ("not_acceptable", "The requested representation is not available."),
    413: ("request_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "The request body must be JSON (Content-Type: application/json)."),
}


class HTTPError(Exception):
    """An edge-level error with its own status (e.g. 413), answered in the one shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def status_for(exc: MailstateError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}}


def _redact(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//***@", text)


def render(exc: MailstateError) -> tuple[int, dict[str, Any]]:
    """The status and body for a mailstate error (also used by MCP, so both say the same)."""
    status = status_for(exc)
    if isinstance(exc, Unavailable):
        return status, error_body(exc.code, _redact(exc.message))
    if status >= 500:
        log.error("internal error [%s]: %s", exc.code, exc.message, exc_info=exc)
        return status, error_body("internal_error", INTERNAL_MESSAGE)
    body = exc.to_dict()
    if isinstance(exc, StateInvalid):
        body["problems"] = exc.problems[:50]
    return status, {"error": body}


def _headers(status: int) -> dict[str, str] | None:
    if status == 401:
        return {"WWW-Authenticate": 'Bearer realm="mailstate"'}
    return None


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers or _headers(status))


def install(app: FastAPI) -> None:
    """Register the handlers that keep every error in the one shape."""

    @app.exception_handler(MailstateError)
    async def _mailstate(request: Request, exc: MailstateError) -> JSONResponse:
        status, body = render(exc)
        return json_error(status, body)

    @app.exception_handler(HTTPError)
    async def _edge(request: Request, exc: HTTPError) -> JSONResponse:
        return json_error(exc.status, error_body(exc.code, exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Routes parse their own input; this only catches a parameter FastAPI validated.
        errors = exc.errors()
        loc = [str(p) for p in errors[0].get("loc", ())] if errors else []
        field = loc[-1] if loc else None
        return json_error(
            400,
            error_body(
                "invalid_request", f"Invalid value for '{field}'." if field else "The request is invalid.", field=field
            ),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _router(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, message = _ROUTER_CODES.get(
            exc.status_code, ("http_error" if exc.status_code < 500 else "internal_error", "The request failed.")
        )
        headers = dict(exc.headers or {}) or _headers(exc.status_code)
        return json_error(exc.status_code, error_body(code, message), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return json_error(500, error_body("internal_error", INTERNAL_MESSAGE))
