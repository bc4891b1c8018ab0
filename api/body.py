"""Request bodies (POST /jobs, POST /tokens), read and parsed by hand (RELIABILITY.md §4,
finding 12).

FastAPI's own parser takes any size of body, `NaN` and lone surrogates. Here: the
content type must be JSON (415), the body is capped by Content-Length and by the bytes
actually streamed (413), orjson parses it (it refuses NaN, Infinity, lone surrogates and
absurd nesting: 422 `json_invalid`), and the jobs are validated by `JobSubmission`: a batch
in one call of a `TypeAdapter` over the whole list (pydantic-core walks the list itself;
every error still names its index and field).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError

from api.errors import JsonInvalid, PayloadTooLarge, UnsupportedMediaType
from common.models import JobSubmission, TokenCreate

M = TypeVar("M", bound=BaseModel)
SUBMISSIONS: TypeAdapter[list[JobSubmission]] = TypeAdapter(list[JobSubmission])
_SCHEMA_REF = "#/components/schemas/{model}"


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is over the limit of {limit} bytes (TIDAL_MAX_BODY_BYTES)",
        {"limit": limit},
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused early when it is not JSON or bigger than `max_bytes`."""
    if not _is_json(request.headers.get("content-type")):
        raise UnsupportedMediaType(
            "Content-Type must be application/json",
            {"content_type": request.headers.get("content-type")},
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JsonInvalid(f"Invalid JSON: {exc}", {"pos": exc.pos}) from None


def _batch_error(msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": msg, "type": kind}])


def _errors(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    return [
        {**err, "loc": (*prefix, *err["loc"])}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _validate(model: type[M], item: Any, prefix: tuple[str | int, ...],
              errors: list[dict[str, Any]]) -> M | None:
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        errors.extend(_errors(exc, prefix))
        return None


def validate_submissions(payload: Any, max_batch: int) -> tuple[list[JobSubmission], bool]:
    """(jobs, is_batch): an object is one job, an array a batch of 1..max_batch jobs."""
    if isinstance(payload, dict):
        try:
            return [JobSubmission.model_validate(payload)], False
        except ValidationError as exc:
            raise RequestValidationError(_errors(exc, ("body",))) from None
    if not isinstance(payload, list):
        raise _batch_error("the body must be a job object or an array of them", "model_type")
    if not payload:
        raise _batch_error("a batch needs at least one job", "too_short")
    if len(payload) > max_batch:
        raise _batch_error(f"a batch holds at most {max_batch} jobs", "too_long")
    try:  # the list's own loc is the index: ("body", 3, "priority")
        return SUBMISSIONS.validate_python(payload), True
    except ValidationError as exc:
        raise RequestValidationError(_errors(exc, ("body",))) from None


async def read_submissions(
    request: Request, *, max_bytes: int, max_batch: int
) -> tuple[list[JobSubmission], bool]:
    return validate_submissions(parse_json(await read_body(request, max_bytes)), max_batch)


async def read_model(request: Request, model: type[M], *, max_bytes: int) -> M:
    """A small JSON body (e.g. POST /tokens) through the same checks, as `model`."""
    errors: list[dict[str, Any]] = []
    value = _validate(model, parse_json(await read_body(request, max_bytes)), ("body",), errors)
    if value is None:
        raise RequestValidationError(errors)
    return value


# -- OpenAPI: bodies are read by hand, so describe them by hand --------------------------------

BODY_MODELS: tuple[type[BaseModel], ...] = (JobSubmission, TokenCreate)


def body_schemas() -> dict[str, Any]:
    """The hand-read body models and the models they use, for `components.schemas`."""
    found: dict[str, Any] = {}
    for model in BODY_MODELS:
        schema = model.model_json_schema(ref_template=_SCHEMA_REF)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads one `model` by hand."""
    ref = {"$ref": _SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


SUBMIT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One job, or an array of jobs for a batch (one Redis round trip).",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": _SCHEMA_REF.format(model="JobSubmission")},
                        {
                            "type": "array",
                            "minItems": 1,
                            "items": {"$ref": _SCHEMA_REF.format(model="JobSubmission")},
                        },
                    ]
                },
                "examples": {
                    "shell": {"value": {"command": ["sh", "-c", "make test"], "priority": "high"}},
                    "python": {
                        "value": {"kind": "python", "function": "common.tasks:echo", "args": [1]}
                    },
                    "batch": {"value": [{"command": ["true"]}, {"command": "echo hi"}]},
                },
            }
        },
    }
}
