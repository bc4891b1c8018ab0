"""/jobs: submit (one or a batch), list, read, cancel.

Hot state is read from the job hash in Redis; jobs whose hash has expired are read from
the SQL mirror (written by the recorder, up to about a second behind Redis).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.body import SUBMIT_OPENAPI, read_submissions
from api.deps import AppState, PrincipalDep, StateDep
from api.validate import check_submissions
from api.waits import wait_detail
from api.watch import job_watch
from common import scripts as sc
from common.errors import Conflict, JobNotFound, LimitExceeded
from common.jobs import hash_from_record, job_from_hash, new_job_id, submission_fields
from common.models import ErrorResponse, Job, JobBatch, JobPage, JobSubmission, State
from common.tables import JobRecord

log = structlog.get_logger("api")
router = APIRouter(prefix="/jobs", tags=["jobs"])

JOB_ID_PATTERN = r"^[0-9a-z]{26}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses (every one is the envelope)."""
    return {code: {"model": ErrorResponse} for code in codes}


ERRORS = error_docs(401, 404, 422, 503)


# -- reading jobs ---------------------------------------------------------------------------


def _mirror_record(engine: Engine, job_id: str) -> JobRecord | None:
    with Session(engine) as session:
        return session.get(JobRecord, job_id)


async def read_job(ctx: AppState, job_id: str) -> Job | None:
    """The job document from its hash, else from the SQL mirror, else None."""
    h = await ctx.redis.hgetall(ctx.keys.job(job_id))
    if h.get("state"):
        return job_from_hash(h)
    rec = await run_in_threadpool(_mirror_record, ctx.engine, job_id)
    return job_from_hash(hash_from_record(rec)) if rec is not None else None


async def visible_job(ctx: AppState, principal: Principal, job_id: str) -> Job:
    """The job, or 404 when it does not exist or belongs to someone else (no leak)."""
    structlog.contextvars.bind_contextvars(job_id=job_id)
    job = await read_job(ctx, job_id) if _JOB_ID.match(job_id) else None
    if job is None or not principal.may_see(job.owner):
        raise JobNotFound(f"job {job_id} not found")
    return job


# -- submitting -----------------------------------------------------------------------------


def _accepted(job_id: str, owner: str, created: Any, fields: dict[str, Any]) -> Job:
    h = {name: str(value) for name, value in fields.items()}
    h.update(id=job_id, state="pending", owner=owner, created_at=str(created), attempt="0")
    return job_from_hash(h)


async def _read_existing(ctx: AppState, ids: list[str]) -> dict[str, Job]:
    pipe = ctx.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(ctx.keys.job(job_id))
    found: dict[str, Job] = {}
    for job_id, h in zip(ids, await pipe.execute(), strict=True):
        job = job_from_hash(h) if h.get("state") else await read_job(ctx, job_id)
        if job is None:
            raise Conflict(f"the idempotency key points at job {job_id}, which no longer exists")
        found[job_id] = job
    return found


def _refused(replies: list[Any], planned: list[tuple[str, Any]]) -> None:
    """A limit submit.lua enforced (a race past the pre-check): 429 naming it, with the
    ids of the jobs of this request that were accepted all the same."""
    refused = [r for r in replies if int(r[0]) < 0]
    if not refused:
        return
    accepted = [job_id for (job_id, _), r in zip(planned, replies, strict=True) if int(r[0]) >= 0]
    code, count = int(refused[0][0]), int(refused[0][1])
    limit = "max_active_per_user" if code == -4 else "max_queue_size"
    raise LimitExceeded(f"{limit}: over the limit ({count} now)",
                        {"limit": limit, "count": count, "accepted": accepted})


async def submit_all(ctx: AppState, owner: str, subs: list[JobSubmission]) -> list[Job]:
    """Write every job in one non-transactional pipeline; answer once Redis replied."""
    s = ctx.settings
    pipe = ctx.redis.pipeline(transaction=False)
    planned: list[tuple[str, dict[str, Any]]] = []
    for sub in subs:
        job_id, fields = new_job_id(), submission_fields(sub, s.stale_after_s)
        call = sc.submit(
            ctx.keys, job_id, owner, fields, events_maxlen=s.events_maxlen,
            idempotency_key=sub.idempotency_key, max_active=s.max_active_per_user,
            max_queue=s.max_queue_size,
        )
        await ctx.scripts.run(call, pipe)  # queues the EVALSHA on the pipeline
        planned.append((job_id, fields))
    replies = await pipe.execute()
    _refused(replies, planned)
    existing = [str(rid) for accepted, rid, _ in replies if int(accepted) != 1]
    deduped = await _read_existing(ctx, existing) if existing else {}
    jobs = [
        _accepted(job_id, owner, created, fields) if int(accepted) == 1 else deduped[str(rid)]
        for (job_id, fields), (accepted, rid, created) in zip(planned, replies, strict=True)
    ]
    log.info("jobs_submitted", owner=owner, count=len(jobs), deduplicated=len(existing),
             job_id=jobs[0].id if len(jobs) == 1 else None)
    return jobs


@router.post(
    "",
    status_code=202,
    response_model=Job | JobBatch,
    summary="Submit one job, or a batch (a JSON array)",
    openapi_extra=SUBMIT_OPENAPI,
    responses=error_docs(401, 409, 413, 415, 422, 503),
)
async def submit_jobs(request: Request, ctx: StateDep, principal: PrincipalDep) -> Job | JobBatch:
    subs, batch = await read_submissions(
        request, max_bytes=ctx.settings.max_body_bytes, max_batch=ctx.settings.max_batch
    )
    await check_submissions(ctx, principal, subs, batch)
    jobs = await submit_all(ctx, principal.user, subs)
    return JobBatch(jobs=jobs) if batch else jobs[0]


# -- listing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobFilter:
    state: State | None = None
    queue: str | None = None
    host: str | None = None
    owner: str | None = None
    cursor: str | None = None


def _query_records(engine: Engine, f: JobFilter, limit: int) -> list[JobRecord]:
    stmt = select(JobRecord)
    if f.state is not None:
        stmt = stmt.where(JobRecord.state == f.state.value)
    if f.queue is not None:
        stmt = stmt.where(JobRecord.queue == f.queue)
    if f.host is not None:
        stmt = stmt.where(JobRecord.host == f.host)
    if f.owner is not None:
        stmt = stmt.where(JobRecord.owner == f.owner)
    if f.cursor is not None:
        stmt = stmt.where(col(JobRecord.id) < f.cursor)
    stmt = stmt.order_by(col(JobRecord.id).desc()).limit(limit)
    with Session(engine) as session:
        return list(session.exec(stmt).all())


async def _overlay(ctx: AppState, records: list[JobRecord]) -> list[Job]:
    """Live state from Redis (one pipeline) over the mirror's rows."""
    pipe = ctx.redis.pipeline(transaction=False)
    for rec in records:
        pipe.hgetall(ctx.keys.job(rec.id))
    hashes = await pipe.execute() if records else []
    return [
        job_from_hash(h) if h.get("state") else job_from_hash(hash_from_record(rec))
        for rec, h in zip(records, hashes, strict=True)
    ]


@router.get("", response_model=JobPage, summary="List jobs, newest first", responses=ERRORS)
async def list_jobs(
    ctx: StateDep,
    principal: PrincipalDep,
    state: State | None = None,
    queue: str | None = None,
    host: str | None = None,
    owner: Annotated[str | None, Query(description="admins only; others see their own")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None, Query(pattern=JOB_ID_PATTERN, description="next_cursor of the last page")
    ] = None,
) -> JobPage:
    owner = owner if principal.admin else principal.user
    f = JobFilter(state=state, queue=queue, host=host, owner=owner, cursor=cursor)
    records = await run_in_threadpool(_query_records, ctx.engine, f, limit + 1)
    more = len(records) > limit
    records = records[:limit]
    jobs = await _overlay(ctx, records)
    if state is not None:  # the mirror may lag: keep what still matches live
        jobs = [job for job in jobs if job.state == state]
    return JobPage(jobs=jobs, next_cursor=records[-1].id if more else None)


# -- one job --------------------------------------------------------------------------------


POLL_BASE_MS = 1000
POLL_MAX_MS = 30_000
MAX_WAIT_S = 60


def poll_after_ms(polls: int) -> int:
    """When to ask again about an unfinished job: 1 s, doubling with each poll the client
    says it made, at most 30 s."""
    return min(POLL_MAX_MS, POLL_BASE_MS << min(polls, 5))


@router.get(
    "/{job_id}", response_model=Job, summary="One job (optionally waiting for it to change)",
    responses=ERRORS,
)
async def get_job(
    job_id: str,
    request: Request,
    response: Response,
    ctx: StateDep,
    principal: PrincipalDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
        "long-poll: answer as soon as the job changes state, or after this many seconds"
    ))] = 0,
    polls: Annotated[int, Query(ge=0, le=1_000_000, description=(
        "how many times the client asked before; poll_after_ms grows with it"
    ))] = 0,
) -> Job:
    # the seq before the document: a transition between the two reads then ends the wait
    seq = await ctx.redis.hget(ctx.keys.job(job_id), "seq") if wait and _JOB_ID.match(job_id) \
        else None
    job = await visible_job(ctx, principal, job_id)
    if seq is not None and not job.state.terminal:
        if await job_watch(request.app.state, ctx).changed(job_id, seq, wait):
            job = await visible_job(ctx, principal, job_id)
    if job.state.terminal:
        return job
    detail = await wait_detail(ctx, job)
    after = poll_after_ms(polls)
    response.headers["Retry-After"] = str(math.ceil(after / 1000))
    return job.model_copy(update={"wait_detail": detail, "poll_after_ms": after})


async def _cancel(ctx: AppState, principal: Principal, job_id: str) -> Any:
    owner, queue, state, host = await ctx.redis.hmget(
        ctx.keys.job(job_id), ["owner", "queue", "state", "host"]
    )
    if state is None:  # only in the mirror (or nowhere): finished long ago
        job = await visible_job(ctx, principal, job_id)
        raise Conflict(f"job {job_id} already finished ({job.state})")
    if not principal.may_see(owner or ""):
        raise JobNotFound(f"job {job_id} not found")
    call = sc.cancel(
        ctx.keys, job_id, queue or "default", host=host or None, by=principal.user,
        events_maxlen=ctx.settings.events_maxlen, ttl_s=ctx.settings.job_ttl_s,
    )
    return await ctx.scripts.run(call)


@router.delete(
    "/{job_id}", status_code=202, response_model=Job, summary="Cancel a job",
    responses=error_docs(401, 404, 409, 503),
)
async def cancel_job(job_id: str, ctx: StateDep, principal: PrincipalDep) -> Job:
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"job {job_id} not found")
    structlog.contextvars.bind_contextvars(job_id=job_id)
    result = await _cancel(ctx, principal, job_id)
    if result == -3:
        raise JobNotFound(f"job {job_id} not found")
    job = await read_job(ctx, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    if result == -1:
        raise Conflict(f"job {job_id} already finished ({job.state})", {"state": job.state})
    log.info("job_cancel", result=result, by=principal.user)
    return job


@router.post(
    "/{job_id}/retry", status_code=202, response_model=Job,
    summary="Run a finished job again (a new attempt of the same job)",
    responses=error_docs(401, 404, 409, 503),
)
async def retry_job(job_id: str, ctx: StateDep, principal: PrincipalDep) -> Job:
    job = await visible_job(ctx, principal, job_id)
    if not await ctx.redis.exists(ctx.keys.job(job_id)):
        raise Conflict(f"job {job_id} is only in the history now; submit it again instead")
    result = await ctx.scripts.run(sc.retry(ctx.keys, job_id, job.owner, by=principal.user,
                                            events_maxlen=ctx.settings.events_maxlen))
    if result == -1:
        raise Conflict(f"job {job_id} has not finished ({job.state})", {"state": job.state})
    log.info("job_retry", by=principal.user)
    return await visible_job(ctx, principal, job_id)
