"""Why a queued job is not running, in the detail a user needs (`wait_detail`)."""

from __future__ import annotations

from typing import Any

from api.deps import AppState
from common.clock import ms_to_iso
from common.models import Job, State


async def wait_detail(ctx: AppState, job: Job) -> dict[str, Any] | None:
    """For the job's wait_reason: its place in the queue, the host's holder and its place
    among the waiters, the unfinished dependencies, what it asks of resources and what is
    in use, when a delayed start or a retry is due."""
    reason = job.wait_reason or ""
    k, r = ctx.keys, ctx.redis
    if job.state == State.RETRYING or reason == "scheduled_at":
        due = await r.zscore(k.delayed(), job.id)
        return {"due_at": ms_to_iso(int(due)) if due is not None else None}
    if job.state != State.QUEUED:
        return None
    if reason.startswith("host:"):
        host = reason.removeprefix("host:")
        pipe = r.pipeline(transaction=False)
        pipe.get(k.host(host))
        pipe.zrank(k.hostwait(host), job.id)
        pipe.zcard(k.hostwait(host))
        holder, rank, waiters = await pipe.execute()
        return {"host": host, "holder": holder,
                "position": None if rank is None else rank + 1, "waiters": waiters}
    if reason == "dependencies":
        return {"unfinished": sorted(await r.smembers(k.deps(job.id)))}
    if reason == "resources":
        used = await r.hgetall(k.ledger())
        return {"asks": job.resources.model_dump(),
                "in_use": {name: float(used.get(name, 0)) for name in ("cpu", "memory_mb", "gpu")}}
    pipe = r.pipeline(transaction=False)
    pipe.zrank(k.queue(job.queue), job.id)
    pipe.zcard(k.queue(job.queue))
    rank, size = await pipe.execute()
    return {"position": None if rank is None else rank + 1, "queued": size}
