"""Every error the API answers, in one envelope: `{"error": {"code", "message", "details"}}`.

The HTTP mapping of Tidal's error tree lives here and nowhere else. Redis being down, read
only, loading or out of disk/memory is a 503 `redis_unavailable`, never a 500
(RELIABILITY.md finding 6).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis.exceptions as rex
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from common.errors import TidalError

log = structlog.get_logger("api")

BEARER = {"WWW-Authenticate": "Bearer"}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "limit_exceeded",
    503: "unavailable",
}

# Redis answers that mean "cannot serve now", not "the request is wrong".
_UNAVAILABLE_CLASSES = (
    rex.ConnectionError,  # also BusyLoadingError (LOADING), MaxConnectionsError
    rex.TimeoutError,
    rex.ReadOnlyError,  # READONLY
    rex.OutOfMemoryError,  # OOM with maxmemory-policy noeviction
    rex.MasterDownError,
    rex.ClusterDownError,
)
_UNAVAILABLE_TEXT = re.compile(r"^(MISCONF|READONLY|LOADING|OOM|MASTERDOWN|CLUSTERDOWN)\b")


# -- API-only errors (the shared tree is in common/errors.py) --------------------------------


class UnsupportedMediaType(TidalError):
    code = "unsupported_media_type"
    status = 415


class PayloadTooLarge(TidalError):
    code = "payload_too_large"
    status = 413


class JsonInvalid(TidalError):
    code = "json_invalid"
    status = 422


class ServiceUnavailable(TidalError):
    code = "unavailable"
    status = 503


# -- building the envelope ------------------------------------------------------------------


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _is_union_tag(part: Any) -> bool:
    """pydantic puts union member names in `loc` (e.g. 'list[constrained-str]')."""
    return isinstance(part, str) and (
        "[" in part or "(" in part or part.startswith(("function-", "constrained-"))
    )


def clean_errors(errors: Iterable[Mapping[str, Any]], prefix: Sequence[str | int] = ()) -> list[
    dict[str, Any]
]:
    """pydantic/FastAPI errors reduced to JSON-safe `{"loc", "msg", "type"}` items."""
    return [
        {
            "loc": [*prefix, *(p for p in err.get("loc", ()) if not _is_union_tag(p))],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in errors
    ]


def where(loc: Sequence[Any]) -> str:
    """`["body", 1, "env", "PATH"]` → `[1].env.PATH` (the request part `body` is implied)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_message(details: Sequence[Mapping[str, Any]]) -> str:
    if not details:
        return "invalid request"
    first = details[0]
    msg = str(first["msg"]).removeprefix("Value error, ")
    at = where(first["loc"])
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{at}: {msg}{more}" if at else f"{msg}{more}"


def validation_response(details: list[dict[str, Any]]) -> JSONResponse:
    return error_response(422, "validation_error", validation_message(details), details)


# -- handlers -------------------------------------------------------------------------------


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_response(clean_errors(exc.errors()))


async def _pydantic_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return validation_response(clean_errors(exc.errors(include_url=False, include_input=False)))


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    detail = exc.detail
    message = detail if isinstance(detail, str) else HTTPStatus(status).phrase
    details = None if isinstance(detail, str) else detail
    code = _HTTP_CODES.get(status, f"http_{status}")
    headers = dict(exc.headers or {})
    if status == 401:
        headers.update(BEARER)
    return error_response(status, code, message, details, headers)


async def _tidal_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TidalError)
    headers = BEARER if exc.status == 401 else None
    if exc.status >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


def redis_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE_CLASSES):
        return True
    return isinstance(exc, rex.ResponseError) and bool(_UNAVAILABLE_TEXT.match(str(exc)))


def unavailable_response(exc: BaseException) -> JSONResponse:
    text = str(exc) or type(exc).__name__
    log.warning("redis_unavailable", error=text, kind=type(exc).__name__)
    return error_response(
        503, "redis_unavailable", f"Redis is unavailable: {text}", None, {"Retry-After": "1"}
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    if redis_unavailable(exc):
        return unavailable_response(exc)
    return await internal_error(request, exc)


async def internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled_error", exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    """Register every handler on the app."""
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(TidalError, _tidal_error)
    app.add_exception_handler(rex.RedisError, _redis_error)
    app.add_exception_handler(Exception, internal_error)
