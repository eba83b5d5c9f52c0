"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every failure a client can cause becomes an :class:`APIError` (or an :class:`af3.AF3Error`, mapped by its
``status_code``); anything else is a 500 whose message says nothing of the server's insides (the log has the
traceback). Request validation errors are 400s naming the field, as OpenAI answers them (FastAPI's default is 422).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AF3Error

logger = logging.getLogger("af3.serve")

#: OpenAI's error type for each status.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 501: "server_error",
         503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """A request the server refuses: status, one-line message, and OpenAI's ``param`` / ``code`` when known."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def from_exception(e: BaseException) -> APIError:
    """Any exception as the APIError a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, AF3Error):
        status = getattr(e, "status_code", 400)
        return APIError(status, " ".join(str(e).split()), code=type(e).__name__)
    logger.error("internal error", exc_info=e)
    return APIError(500, "internal server error (the server's log has the details)")


def _response(e: APIError) -> JSONResponse:
    return JSONResponse(body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


async def api_error_handler(_: Request, e: Exception) -> JSONResponse:
    return _response(from_exception(e))


async def validation_handler(_: Request, e: RequestValidationError) -> JSONResponse:
    return _response(from_validation(e.errors()))


def from_validation(errors: list[dict]) -> APIError:
    """pydantic's errors (the first one) as a 400 naming the field, in OpenAI's words."""
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p not in ("body", "form", "query")]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        param = None
    elif first.get("type") == "missing":
        message = f"{param} is required"
    elif first.get("type") == "model_type":
        message = "the body must be a JSON object"
    else:
        message = f"{param}: {message}" if param else message
    return APIError(400, message, param=param, code="invalid_value")


async def http_error_handler(_: Request, e: StarletteHTTPException) -> JSONResponse:
    message = {404: "no such route", 405: "method not allowed"}.get(e.status_code, str(e.detail))
    return _response(APIError(e.status_code, message, headers=getattr(e, "headers", None)))
