"""Checks of a submission that need Redis or settings, done before anything is written:
dependencies must exist (and be visible to the submitter), resources must fit the largest
job the cluster allows. The user's and queues' limits are checked by submit.lua itself,
atomically for each call of it (up to SUBMIT_CALL_JOBS jobs, so for all but the largest
batches for the whole request at once); a request split over several calls is checked
here first as a whole, so a batch is not half accepted unless a race slips past."""

from __future__ import annotations

from collections import Counter

from api.auth import Principal
from api.deps import AppState
from common.errors import InvalidSubmission, LimitExceeded
from common.models import JobSubmission
from common.settings import Settings

# Jobs per submit.lua call: one call keeps Redis busy for about a millisecond per 100 jobs,
# so a batch of 10,000 is cut into calls that let other clients in between.
SUBMIT_CALL_JOBS = 1000


def _field_error(index: int | None, loc: list[str | int], msg: str) -> InvalidSubmission:
    where = ([index] if index is not None else []) + loc
    name = ".".join(str(p) for p in where)
    return InvalidSubmission(f"{name}: {msg}", [{"loc": ["body", *where], "msg": msg,
                                                 "type": "value_error"}])


def check_resources(ctx: AppState, subs: list[JobSubmission], batch: bool) -> None:
    s = ctx.settings
    cpu, memory_mb, gpu = s.max_job_cpu, s.max_job_memory_mb, s.max_job_gpu
    for i, sub in enumerate(subs):
        res = sub.resources
        if res.cpu <= cpu and res.memory_mb <= memory_mb and res.gpu <= gpu:
            continue  # the common case: one comparison per limit, no lookups by name
        for name, most in (("cpu", cpu), ("memory_mb", memory_mb), ("gpu", gpu)):
            asked = getattr(res, name)
            if asked > most:
                raise _field_error(i if batch else None, ["resources", name],
                                   f"{asked} is more than the largest job allowed ({most})")


async def check_dependencies(
    ctx: AppState, principal: Principal, subs: list[JobSubmission], batch: bool
) -> None:
    wanted = [(i, j, d.id) for i, sub in enumerate(subs) if sub.depends_on
              for j, d in enumerate(sub.dependencies())]
    if not wanted:
        return
    pipe = ctx.redis.pipeline(transaction=False)
    for _, _, dep in wanted:
        pipe.hget(ctx.keys.job(dep), "owner")
    for (i, j, dep), owner in zip(wanted, await pipe.execute(), strict=True):
        if owner is None or not principal.may_see(owner):
            raise _field_error(i if batch else None, ["depends_on", j],
                               f"no job {dep} to depend on (unknown, or finished and expired)")


def over_active(s: Settings, owner: str, active: int) -> LimitExceeded:
    return LimitExceeded(
        f"max_active_per_user: {owner} has {active} active jobs; the limit is "
        f"{s.max_active_per_user}",
        {"limit": "max_active_per_user", "max": s.max_active_per_user, "count": active},
    )


def over_queue(s: Settings, queue: str, size: int) -> LimitExceeded:
    return LimitExceeded(
        f"max_queue_size: queue {queue} holds {size} jobs; the limit is {s.max_queue_size}",
        {"limit": "max_queue_size", "max": s.max_queue_size, "count": size, "queue": queue},
    )


async def check_limits(ctx: AppState, owner: str, subs: list[JobSubmission]) -> None:
    s = ctx.settings
    per_queue = Counter(sub.queue for sub in subs)
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.hget(ctx.keys.user(owner), "active")
    for queue in per_queue:
        pipe.zcard(ctx.keys.queue(queue))
    active, *sizes = await pipe.execute()
    active = int(active or 0)
    if s.max_active_per_user and active + len(subs) > s.max_active_per_user:
        raise over_active(s, owner, active)
    for (queue, n), size in zip(per_queue.items(), sizes, strict=True):
        if s.max_queue_size and size + n > s.max_queue_size:
            raise over_queue(s, queue, size)


async def check_submissions(
    ctx: AppState, principal: Principal, subs: list[JobSubmission], batch: bool
) -> None:
    check_resources(ctx, subs, batch)
    await check_dependencies(ctx, principal, subs, batch)
    if len(subs) > SUBMIT_CALL_JOBS:
        await check_limits(ctx, principal.user, subs)
