"""/queues: each queue now. Live figures come from Redis in a few pipelined round trips
(`cluster_view`, shared with /metrics); delayed jobs and the completion rates come from
the SQL mirror (`queue_history`), which lags Redis by well under a second.

- queued: ZCARD of the queue (jobs eligible to run, waiting for a slot by priority)
- in_flight: XLEN of the dispatch stream (dispatched or running: entries are deleted when
  the job finishes)
- running: pending entries of the dispatch stream's `workers` group (read by a worker)
- workers, slots: live workers serving the queue and their slots (a worker serving two
  queues counts in both)
- delayed: scheduled starts and retry back-offs (the delayed set is shared by all queues,
  so the split by queue comes from the mirror)
- completed_1m/failed_1m/completed_1h/failed_1h: jobs that ended so in the last minute/hour
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from redis.exceptions import ResponseError
from sqlalchemy import case, func, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import error_docs
from api.routes.workers import live_workers
from common.clock import now_ms
from common.keys import GROUP_RECORDER, GROUP_WORKERS
from common.models import QueueInfo, State, WorkerInfo
from common.tables import JobRecord

router = APIRouter(prefix="/queues", tags=["queues"])

MINUTE_MS = 60_000
HOUR_MS = 3_600_000


# -- live state from Redis --------------------------------------------------------------------


@dataclass
class QueueLive:
    queued: int = 0
    in_flight: int = 0
    running: int = 0


@dataclass
class RecorderLag:
    """The recorder group on the events stream: entries not yet read (None: Redis cannot
    tell, e.g. after a trim), read but not acknowledged, and the age of the oldest entry
    not yet read (0 when it is up to date)."""

    lag: int | None
    pending: int
    seconds: float | None


@dataclass
class ClusterView:
    queues: dict[str, QueueLive]
    delayed: int
    workers: list[WorkerInfo]
    hosts_held: int = 0
    host_waiters: int = 0
    recorder: RecorderLag | None = None
    now_ms: int = 0  # Redis' clock
    hosts: list[str] = field(default_factory=list)


def _ok(value: Any, default: Any) -> Any:
    """A pipelined reply, or `default` for a command error about the key (NOGROUP, no such
    key); a connection error is raised."""
    if isinstance(value, ResponseError):
        return default
    if isinstance(value, Exception):
        raise value
    return value


def _recorder_group(groups: Any) -> dict[str, Any] | None:
    for group in groups or []:
        if group.get("name") == GROUP_RECORDER:
            return dict(group)
    return None


async def _recorder_lag(ctx: AppState, groups: Any, now: int) -> RecorderLag | None:
    group = _recorder_group(groups)
    if group is None:
        return None
    lag = group.get("lag")
    pending = int(group.get("pending") or 0)
    seconds: float | None = 0.0
    if lag is None or int(lag) > 0:
        last = str(group.get("last-delivered-id") or "0-0")
        oldest = await ctx.redis.xrange(ctx.keys.events(), min=f"({last}", max="+", count=1)
        seconds = max(0.0, (now - int(str(oldest[0][0]).split("-")[0])) / 1000) if oldest \
            else 0.0
    return RecorderLag(lag=None if lag is None else int(lag), pending=pending, seconds=seconds)


async def cluster_view(ctx: AppState) -> ClusterView:
    """Queues, workers, hosts and the recorder's lag, read from Redis."""
    k, r = ctx.keys, ctx.redis
    workers = await live_workers(ctx)
    pipe = r.pipeline(transaction=False)
    pipe.smembers(k.queues())
    pipe.smembers(k.hosts())
    pipe.zcard(k.delayed())
    pipe.xinfo_groups(k.events())
    pipe.time()
    names, hosts, delayed, groups, clock = await pipe.execute(raise_on_error=False)
    secs, micros = _ok(clock, divmod(now_ms() * 1000, 1_000_000))  # Redis' clock if it tells
    queues = sorted(set(_ok(names, set())) | {q for w in workers for q in w.queues})
    hosts = sorted(_ok(hosts, set()))
    pipe = r.pipeline(transaction=False)
    for name in queues:
        pipe.zcard(k.queue(name))
        pipe.xlen(k.dispatch(name))
        pipe.xpending(k.dispatch(name), GROUP_WORKERS)
    for host in hosts:
        pipe.exists(k.host(host))
        pipe.zcard(k.hostwait(host))
    replies = await pipe.execute(raise_on_error=False) if queues or hosts else []
    live = {
        name: QueueLive(
            queued=int(_ok(replies[3 * i], 0)), in_flight=int(_ok(replies[3 * i + 1], 0)),
            running=int((_ok(replies[3 * i + 2], None) or {}).get("pending") or 0),
        )
        for i, name in enumerate(queues)
    }
    at = 3 * len(queues)
    now = int(secs) * 1000 + int(micros) // 1000
    return ClusterView(
        queues=live, delayed=int(_ok(delayed, 0)), workers=workers,
        hosts_held=sum(int(_ok(replies[at + 2 * i], 0)) for i in range(len(hosts))),
        host_waiters=sum(int(_ok(replies[at + 2 * i + 1], 0)) for i in range(len(hosts))),
        recorder=await _recorder_lag(ctx, _ok(groups, []), now), now_ms=now, hosts=hosts,
    )


# -- history from the SQL mirror --------------------------------------------------------------


@dataclass
class QueueHistory:
    delayed: int = 0
    completed_1m: int = 0
    failed_1m: int = 0
    completed_1h: int = 0
    failed_1h: int = 0


def queue_history(engine: Engine, now: int) -> dict[str, QueueHistory]:
    """Per queue: delayed jobs, and jobs completed or failed in the last minute and hour.
    Two indexed queries (state; finished_at)."""
    found: dict[str, QueueHistory] = {}
    ended = col(JobRecord.state).in_([State.COMPLETED.value, State.FAILED.value])
    recent = case((col(JobRecord.finished_at) >= now - MINUTE_MS, 1), else_=0)
    rates = (
        select(JobRecord.queue, JobRecord.state, func.count(), func.sum(recent))
        .where(col(JobRecord.finished_at) >= now - HOUR_MS, ended)
        .group_by(JobRecord.queue, JobRecord.state)
    )
    delayed = (
        select(JobRecord.queue, func.count())
        .where(or_(col(JobRecord.state) == State.RETRYING.value,
                   (col(JobRecord.state) == State.QUEUED.value)
                   & (col(JobRecord.wait_reason) == "scheduled_at")))
        .group_by(JobRecord.queue)
    )
    with Session(engine) as session:
        for queue, state, hour, minute in session.exec(rates).all():
            h = found.setdefault(queue, QueueHistory())
            if state == State.COMPLETED.value:
                h.completed_1h, h.completed_1m = int(hour), int(minute or 0)
            else:
                h.failed_1h, h.failed_1m = int(hour), int(minute or 0)
        for queue, count in session.exec(delayed).all():
            found.setdefault(queue, QueueHistory()).delayed = int(count)
    return found


# -- the route --------------------------------------------------------------------------------


async def queue_infos(ctx: AppState) -> list[QueueInfo]:
    view = await cluster_view(ctx)
    history = await run_in_threadpool(queue_history, ctx.engine, view.now_ms)
    infos = []
    for name in sorted(set(view.queues) | set(history)):
        live, past = view.queues.get(name, QueueLive()), history.get(name, QueueHistory())
        serving = [w for w in view.workers if name in w.queues]
        infos.append(QueueInfo(
            queue=name, queued=live.queued, in_flight=live.in_flight, running=live.running,
            delayed=past.delayed, workers=len(serving), slots=sum(w.slots for w in serving),
            completed_1m=past.completed_1m, failed_1m=past.failed_1m,
            completed_1h=past.completed_1h, failed_1h=past.failed_1h,
        ))
    return infos


@router.get("", response_model=list[QueueInfo], summary="Queues: depth, running, rates",
            responses=error_docs(401, 503))
async def list_queues(ctx: StateDep, _: PrincipalDep) -> list[QueueInfo]:
    return await queue_infos(ctx)
