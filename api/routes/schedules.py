"""/schedules: cron schedules that submit a job at each tick (fired by the schedulers)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from fastapi import APIRouter, Response

from api.auth import Principal
from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import error_docs
from api.validate import check_resources
from common.cron import Schedule, ScheduleCreate, next_fire_ms
from common.errors import Conflict, JobNotFound

router = APIRouter(prefix="/schedules", tags=["schedules"])


async def _read(ctx: AppState, name: str) -> Schedule | None:
    raw = await ctx.redis.hget(ctx.keys.cron_specs(), name)
    if raw is None:
        return None
    schedule = Schedule.model_validate(orjson.loads(raw))
    nxt = await ctx.redis.zscore(ctx.keys.cron(), name)
    when = datetime.fromtimestamp(nxt / 1000, tz=UTC) if nxt is not None else None
    return schedule.model_copy(update={"next_fire_at": when})


async def _visible(ctx: AppState, principal: Principal, name: str) -> Schedule:
    schedule = await _read(ctx, name)
    if schedule is None or not principal.may_see(schedule.owner):
        raise JobNotFound(f"schedule {name} not found")
    return schedule


@router.post("", status_code=201, response_model=Schedule, summary="Create a cron schedule",
             responses=error_docs(401, 409, 422, 503))
async def create_schedule(body: ScheduleCreate, ctx: StateDep,
                          principal: PrincipalDep) -> Schedule:
    check_resources(ctx, [body.job], batch=False)
    if await ctx.redis.hexists(ctx.keys.cron_specs(), body.name):
        raise Conflict(f"schedule {body.name} already exists; remove it first")
    schedule = Schedule(**body.model_dump(), owner=principal.user)
    sec, usec = await ctx.redis.time()
    nxt = next_fire_ms(body.cron, int(sec) * 1000 + int(usec) // 1000)
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.hset(ctx.keys.cron_specs(), body.name, schedule.model_dump_json(exclude={"next_fire_at"}))
    pipe.zadd(ctx.keys.cron(), {body.name: nxt})
    await pipe.execute()
    return await _visible(ctx, principal, body.name)


@router.get("", response_model=list[Schedule], summary="Cron schedules",
            responses=error_docs(401, 503))
async def list_schedules(ctx: StateDep, principal: PrincipalDep) -> list[Schedule]:
    names = sorted(await ctx.redis.hkeys(ctx.keys.cron_specs()))
    found = [await _read(ctx, name) for name in names]
    return [s for s in found if s is not None and principal.may_see(s.owner)]


@router.delete("/{name}", status_code=204, summary="Remove a cron schedule",
               responses=error_docs(401, 404, 503))
async def remove_schedule(name: str, ctx: StateDep, principal: PrincipalDep) -> Response:
    await _visible(ctx, principal, name)
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.hdel(ctx.keys.cron_specs(), name)
    pipe.zrem(ctx.keys.cron(), name)
    await pipe.execute()
    return Response(status_code=204)
