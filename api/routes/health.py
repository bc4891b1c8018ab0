"""/healthz and /readyz: Redis answers PING and the SQL mirror answers SELECT 1."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, StateDep
from api.errors import error_response
from common.models import ErrorResponse, Health

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 2.0


def package_version() -> str:
    try:
        return version("tidal")
    except PackageNotFoundError:
        return "unknown"


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def _check(ctx: AppState) -> dict[str, str]:
    """What is down, with why (empty when all is well)."""
    down: dict[str, str] = {}
    try:
        await asyncio.wait_for(ctx.redis.ping(), CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure means "down"
        down["redis"] = str(exc) or type(exc).__name__
    try:
        await asyncio.wait_for(run_in_threadpool(_select_one, ctx.engine), CHECK_TIMEOUT_S)
    except Exception as exc:
        down["database"] = str(exc) or type(exc).__name__
    return down


async def health(ctx: AppState) -> Health | JSONResponse:
    down = await _check(ctx)
    if down:
        message = "; ".join(f"{name} is down: {why}" for name, why in down.items())
        return error_response(503, "unavailable", message, down)
    return Health(status="ok", redis=True, database=True, version=package_version())


RESPONSES: dict[int | str, dict[str, object]] = {503: {"model": ErrorResponse}}


@router.get("/healthz", response_model=Health, summary="Liveness", responses=RESPONSES)
async def healthz(ctx: StateDep) -> Health | JSONResponse:
    return await health(ctx)


@router.get("/readyz", response_model=Health, summary="Readiness", responses=RESPONSES)
async def readyz(ctx: StateDep) -> Health | JSONResponse:
    return await health(ctx)
