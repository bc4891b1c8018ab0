"""/workers: the live workers, from their heartbeat hashes (which expire with the worker)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import error_docs
from common.models import WorkerInfo

router = APIRouter(prefix="/workers", tags=["workers"])


def _time(ms: str | float | None) -> datetime | None:
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(float(ms) / 1000, tz=UTC)


def _split(text: str | None) -> list[str]:
    return [part for part in (text or "").split(",") if part]


def worker_info(worker_id: str, h: dict[str, str], score: float) -> WorkerInfo:
    """A worker hash (fields written by the worker's heartbeat) as the wire model."""
    return WorkerInfo(
        id=worker_id,
        hostname=h.get("hostname", ""),
        pid=int(h.get("pid") or 0),
        queues=_split(h.get("queues")),
        slots=int(h.get("slots") or 0),
        running=_split(h.get("running")),
        last_heartbeat=_time(h.get("last_heartbeat") or score),
        started_at=_time(h.get("started_at")),
    )


async def live_workers(ctx: AppState) -> list[WorkerInfo]:
    registry = ctx.keys.workers()
    members: list[tuple[str, float]] = await ctx.redis.zrange(registry, 0, -1, withscores=True)
    pipe = ctx.redis.pipeline(transaction=False)
    for worker_id, _ in members:
        pipe.hgetall(ctx.keys.worker(worker_id))
    hashes = await pipe.execute() if members else []
    live, gone = [], []
    for (worker_id, score), h in zip(members, hashes, strict=True):
        if h:
            live.append(worker_info(worker_id, h, score))
        else:
            gone.append(worker_id)
    if gone:  # the hash expired with its TTL: the worker is dead
        await ctx.redis.zrem(registry, *gone)
    return sorted(live, key=lambda w: w.id)


@router.get("", response_model=list[WorkerInfo], summary="Live workers",
            responses=error_docs(401, 503))
async def list_workers(ctx: StateDep, _: PrincipalDep) -> list[WorkerInfo]:
    return await live_workers(ctx)
