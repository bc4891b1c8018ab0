"""/hosts: each host's holder and its waiters (at most one job runs per host)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep, StateDep
from api.routes.jobs import error_docs
from common.models import HostInfo

router = APIRouter(prefix="/hosts", tags=["hosts"])
SHOWN_WAITERS = 100


@router.get("", response_model=list[HostInfo], summary="Hosts, their holders and waiters",
            responses=error_docs(401, 503))
async def list_hosts(ctx: StateDep, _principal: PrincipalDep) -> list[HostInfo]:
    k = ctx.keys
    names = sorted(await ctx.redis.smembers(k.hosts()))
    pipe = ctx.redis.pipeline(transaction=False)
    for name in names:
        pipe.get(k.host(name))
        pipe.zrange(k.hostwait(name), 0, SHOWN_WAITERS - 1)
        pipe.zcard(k.hostwait(name))
    rows = await pipe.execute() if names else []
    return [
        HostInfo(host=name, holder=rows[3 * i], waiters=rows[3 * i + 1], waiting=rows[3 * i + 2])
        for i, name in enumerate(names)
    ]
