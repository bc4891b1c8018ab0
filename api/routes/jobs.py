"""/jobs: submit (one or a batch), list, read, cancel.

Hot state is read from the job hash in Redis; jobs whose hash has expired are read from
the SQL mirror (written by the recorder, up to about a second behind Redis).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from typing import Annotated, Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Query, Request, Response
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.body import SUBMIT_OPENAPI, read_submissions
from api.deps import BEARER_SECURITY, AppState, CallerDep, PrincipalDep, StateDep
from api.validate import SUBMIT_CALL_JOBS, check_submissions, over_active, over_queue
from api.waits import wait_detail
from api.watch import job_watch
from common import scripts as sc
from common.clock import monotonic, ms_to_iso
from common.errors import Conflict, InvalidSubmission, JobNotFound, LimitExceeded
from common.jobs import (
    NESTED_FIELDS,
    hash_from_record,
    job_from_hash,
    submission_fields,
    submission_specs,
)
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


async def read_job(ctx: AppState, job_id: str, h: dict[str, str] | None = None) -> Job | None:
    """The job document from its hash (`h` when the caller read it already), else from
    the SQL mirror, else None."""
    if h is None:
        h = await ctx.redis.hgetall(ctx.keys.job(job_id))
    if h.get("state"):
        return job_from_hash(h)
    rec = await run_in_threadpool(_mirror_record, ctx.engine, job_id)
    return job_from_hash(hash_from_record(rec)) if rec is not None else None


async def visible_job(ctx: AppState, principal: Principal, job_id: str,
                      h: dict[str, str] | None = None) -> Job:
    """The job, or 404 when it does not exist or belongs to someone else (no leak)."""
    structlog.contextvars.bind_contextvars(job_id=job_id)
    job = await read_job(ctx, job_id, h) if _JOB_ID.match(job_id) else None
    if job is None or not principal.may_see(job.owner):
        raise JobNotFound(f"job {job_id} not found")
    return job


# -- submitting -----------------------------------------------------------------------------
#
# POST /jobs costs one Redis round trip: submit.lua in batch mode takes up to
# SUBMIT_CALL_JOBS jobs per call, checks the limits for all of them and writes them (the
# answer is sent only once Redis has replied). The answer's documents are built from the
# validated submissions, not read back: they are what GET /jobs/{id} shows for a job that
# is still pending (tests/integration/test_api_submit_path.py holds them to that).

# how long an idempotency key maps to its job (as common.scripts.submit's default)
IDEMPOTENCY_TTL_S = 86400
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits → two characters
_RANDOM_SPAN = 1 << 80


def _base32(value: int, pairs: int) -> str:
    """`value` as 2 × `pairs` Crockford base32 characters (10 bits per pair)."""
    return "".join(_PAIRS[(value >> shift) & 1023] for shift in range(10 * pairs - 10, -1, -10))


class JobIds:
    """Job ids in the form of common.jobs.new_job_id (a ULID: 48 bits of milliseconds, 80
    random bits, 26 lower-case characters), made many at a time: consecutive ids share
    all but their last four characters, which come from a table. Monotonic within the
    process, as python-ulid's generator is: within one millisecond (or if the clock steps
    back) the random part counts on from the last id."""

    def __init__(self) -> None:
        self._ms = -1
        self._last = 0

    def take(self, n: int) -> list[str]:
        ms = time.time_ns() // 1_000_000
        if ms <= self._ms and self._last + n < _RANDOM_SPAN:
            ms, first = self._ms, self._last + 1
        else:
            ms = max(ms, self._ms + 1)
            first = int.from_bytes(os.urandom(10)) >> 1  # room to count on from it
        self._ms, self._last = ms, first + n - 1
        stamp = _base32(ms, 5)  # 50 bits: the first two are zero
        ids: list[str] = []
        high, head = -1, ""
        for value in range(first, first + n):
            if value >> 20 != high:  # the first 22 characters change once in 2**20 ids
                high = value >> 20
                head = stamp + _base32(high, 6)
            ids.append(head + _PAIRS[(value >> 10) & 1023] + _PAIRS[value & 1023])
        return ids


job_ids = JobIds()


@cache
def _pending_document() -> tuple[dict[str, Any], frozenset[str]]:
    """(the document of a just-accepted job whose submission is all defaults, the
    submission fields the document does not show), from job_from_hash itself."""
    doc = job_from_hash({"id": "", "state": "pending", "owner": "", "created_at": "0",
                         "attempt": "0"}).model_dump(mode="json")
    return doc, frozenset(JobSubmission.model_fields) - set(doc)


_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)


@lru_cache(maxsize=64)
def _created_at(ms: int) -> Any:
    """created_at as the document shows it (pydantic's datetime text, as for GET)."""
    return _DATETIME.dump_python(_DATETIME.validate_python(ms_to_iso(ms)), mode="json")


@lru_cache(maxsize=1024)
def _pending_members(given: tuple[str, ...]) -> bytes:
    """The members (JSON, no braces) of the all-defaults document that a spec with the
    fields `given` leaves as they are, but id, owner and created_at."""
    pending, _ = _pending_document()
    left = set(given) | {"id", "owner", "created_at"}
    return orjson.dumps({k: v for k, v in pending.items() if k not in left})[1:-1]


@lru_cache(maxsize=64)
def _created_at_json(ms: int) -> bytes:
    return orjson.dumps(_created_at(ms))


def pending_documents(owner: str, ids: list[str], subs: list[JobSubmission],
                      specs: list[dict[str, Any]], spec_json: list[str]
                      ) -> list[tuple[bytes, bytes]]:
    """The documents GET /jobs/{id} shows for just-accepted jobs, as JSON cut where
    `created_at` goes (Redis says when, in its reply): id and owner, then the spec's
    members (a spec holds only what differs from the defaults; `spec_json` is its JSON as
    stored), then the all-defaults document's other members, made once per set of fields.
    A spec with a field the document does not show, or shows in full where the spec
    leaves defaults out (a nested model), goes the way of a dict."""
    pending, hidden = _pending_document()
    owner_json = orjson.dumps(owner)
    docs: list[tuple[bytes, bytes]] = []
    for job_id, sub, spec, text in zip(ids, subs, specs, spec_json, strict=True):
        head = b'{"id":"' + job_id.encode() + b'","owner":' + owner_json + b',"created_at":'
        if hidden.isdisjoint(spec) and NESTED_FIELDS.isdisjoint(spec):
            members = text.encode()[1:-1]
            rest = _pending_members(tuple(spec))
            docs.append((head, b"," + members + b"," + rest + b"}" if members
                         else b"," + rest + b"}"))
            continue
        doc = {**pending, **spec}
        for name in hidden.intersection(spec):
            del doc[name]
        nested = NESTED_FIELDS.intersection(spec)
        if nested:
            doc.update(sub.model_dump(mode="json", include=set(nested)))
        for name in ("id", "owner", "created_at"):
            del doc[name]
        docs.append((head, b"," + orjson.dumps(doc)[1:-1] + b"}"))
    return docs


# the hash fields every job has, sent by position in batch mode (submit.lua)
_FIXED_FIELDS = ("kind", "queue", "priority", "retries", "spec")


def _submit_call(ctx: AppState, owner: str, ids: list[str], subs: list[JobSubmission],
                 fields: list[dict[str, Any]], start: int, end: int) -> sc.Call:
    """submit.lua in batch mode for the jobs start..end-1 (ids, submissions, hash fields
    made without the default stale_after, which goes once for the call). A call of one
    job asks for direct admission (settings.admit_direct)."""
    k, s = ctx.keys, ctx.settings
    keys = [k.submissions(), k.events(), k.user(owner), k.seq()]
    default_stale_ms = int(s.stale_after_s * 1000) if s.stale_after_s else 0
    direct = s.admit_direct and end - start == 1  # submit.lua admits it itself (if plain)
    args: list[Any] = ["*", s.events_maxlen, owner, s.max_active_per_user, s.max_queue_size,
                       default_stale_ms, int(s.priority_step_s * 1000) if direct else ""]
    job_key, queues = k.job, {}
    for i in range(start, end):
        sub, f = subs[i], fields[i]
        job, idem, queue = job_key(ids[i]), sub.idempotency_key, sub.queue
        queue_key = queues.get(queue) or queues.setdefault(queue, k.queue(queue))
        keys += (job, k.idem(owner, idem) if idem else job, queue_key)
        args += (ids[i], IDEMPOTENCY_TTL_S if idem else 0, f["kind"], f["queue"],
                 f["priority"], f["retries"], f["spec"], 2 * (len(f) - 5))
        if len(f) > 5:
            for name, value in f.items():
                if name not in _FIXED_FIELDS:
                    args += (name, value)
    if direct:
        queue = subs[start].queue
        keys += (k.delayed(), k.queues(), k.stale(), k.ledger(), k.dispatch(queue),
                 k.capacity(queue))
    return sc.Call("submit", keys, args)


async def _read_existing(ctx: AppState, ids: list[str]) -> dict[str, dict[str, Any]]:
    pipe = ctx.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(ctx.keys.job(job_id))
    found: dict[str, dict[str, Any]] = {}
    for job_id, h in zip(ids, await pipe.execute(), strict=True):
        job = job_from_hash(h) if h.get("state") else await read_job(ctx, job_id)
        if job is None:
            raise Conflict(f"the idempotency key points at job {job_id}, which no longer exists")
        found[job_id] = job.model_dump(mode="json")
    return found


def _refused(ctx: AppState, owner: str, reply: list[Any], part: list[JobSubmission],
             accepted: list[str]) -> LimitExceeded:
    """The 429 for a call submit.lua refused whole: it names the limit and the count, and
    lists the jobs of the request accepted by earlier calls (a batch of more than one call
    whose later part lost a race; otherwise none)."""
    if int(reply[0]) == -4:
        exc = over_active(ctx.settings, owner, int(reply[1]))
    else:
        exc = over_queue(ctx.settings, part[int(reply[2]) - 1].queue, int(reply[1]))
    exc.details = {**exc.details, "accepted": accepted}
    return exc


MAX_WAIT_S = 60  # the longest long-poll (GET /jobs/{id}?wait=, POST /jobs?wait=)

# from this many jobs in a request on, the answer's documents are built while Redis runs
# the first submit.lua call
OVERLAP_JOBS = 50


async def submit_documents(ctx: AppState, owner: str, subs: list[JobSubmission],
                           ids: list[str] | None = None, *, waited: bool = False
                           ) -> list[bytes]:
    """Write the jobs (one submit.lua call per SUBMIT_CALL_JOBS of them) and answer their
    documents (JSON) in request order, once Redis has replied. For a batch, the
    documents are built while Redis runs the first call, on the other core. `ids`: the
    jobs' ids, made beforehand; `waited`: the request waits for their end (the hash field
    `waited`: finish.lua sends the document along with the end, see api/watch.py)."""
    n = len(subs)
    ids = ids or job_ids.take(n)
    specs = submission_specs(subs)
    # no default stale_after here: submit.lua adds it to the jobs that give none
    fields = [submission_fields(sub, None, spec) for sub, spec in zip(subs, specs, strict=True)]
    if waited:
        for f in fields:
            f["waited"] = 1
    parts = [(start, min(start + SUBMIT_CALL_JOBS, n)) for start in range(0, n, SUBMIT_CALL_JOBS)]
    first: Awaitable[Any] = ctx.scripts.run(_submit_call(ctx, owner, ids, subs, fields, *parts[0]))
    spec_json = [str(f["spec"]) for f in fields]
    if n < OVERLAP_JOBS:  # too few documents to be worth a task and a loop turn
        docs = pending_documents(owner, ids, subs, specs, spec_json)
    else:
        first = asyncio.ensure_future(first)
        try:
            await asyncio.sleep(0)  # the call goes out (packed and written) before the docs
            docs = pending_documents(owner, ids, subs, specs, spec_json)
        except BaseException:
            await asyncio.gather(first, return_exceptions=True)
            raise
    replies: list[Any] = []
    for start, end in parts:
        reply = await (first if start == 0 else ctx.scripts.run(
            _submit_call(ctx, owner, ids, subs, fields, start, end)))
        if int(reply[0]) < 0:
            accepted = [ids[i // 3] for i in range(0, len(replies), 3) if int(replies[i]) == 1]
            raise _refused(ctx, owner, reply, subs[start:end], accepted)
        replies += reply[1:]
    existing = [str(replies[i + 1]) for i in range(0, len(replies), 3) if int(replies[i]) != 1]
    deduped = await _read_existing(ctx, existing) if existing else {}
    answers: list[bytes] = []
    for i, (head, tail) in enumerate(docs):
        status, rid, created = replies[3 * i:3 * i + 3]
        if int(status) == 1:
            answers.append(head + _created_at_json(int(created)) + tail)
        else:
            answers.append(orjson.dumps(deduped[str(rid)]))
    log.info("jobs_submitted", owner=owner, count=n, deduplicated=len(existing),
             job_id=ids[0] if n == 1 else None)
    return answers


async def submit_all(ctx: AppState, owner: str, subs: list[JobSubmission]) -> list[Job]:
    """submit_documents, as Job models (for callers that want them: the WebSocket)."""
    return [Job.model_validate_json(doc) for doc in await submit_documents(ctx, owner, subs)]


@router.post(
    "",
    status_code=202,
    response_model=Job | JobBatch,
    summary="Submit one job, or a batch (a JSON array)",
    openapi_extra={**SUBMIT_OPENAPI, **BEARER_SECURITY},
    responses=error_docs(401, 409, 413, 415, 422, 429, 503),
)
async def submit_jobs(
    request: Request,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
        "one job only: answer once it finished, or after this many seconds with the "
        "document as it stands (then wait with GET /jobs/{id}?wait=&until=finished)"
    ))] = 0,
) -> Response:
    ctx, principal = caller
    subs, batch = await read_submissions(
        request, max_bytes=ctx.settings.max_body_bytes, max_batch=ctx.settings.max_batch
    )
    if wait and batch:
        msg = "is for one job; wait for a batch's jobs one by one (GET /jobs/{id}?wait=)"
        raise InvalidSubmission(f"wait: {msg}", [{"loc": ["query", "wait"], "msg": msg,
                                                  "type": "value_error"}])
    await check_submissions(ctx, principal, subs, batch)
    if wait:  # submit and wait in one request: the job is accepted whatever the wait says
        return await _submit_and_wait(request, ctx, principal, subs[0], wait)
    docs = await submit_documents(ctx, principal.user, subs)
    # the documents are JSON already: no response-model validation round
    body = b'{"jobs":[' + b",".join(docs) + b"]}" if batch else docs[0]
    return Response(body, status_code=202, media_type="application/json")


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


def poll_after_ms(polls: int) -> int:
    """When to ask again about an unfinished job: 1 s, doubling with each poll the client
    says it made, at most 30 s."""
    return min(POLL_MAX_MS, POLL_BASE_MS << min(polls, 5))


@router.get(
    "/{job_id}", response_model=Job, summary="One job (optionally waiting for it to change)",
    responses=ERRORS, openapi_extra=BEARER_SECURITY,
)
async def get_job(
    job_id: str,
    request: Request,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
        "long-poll: answer as soon as the job changes state, or after this many seconds"
    ))] = 0,
    polls: Annotated[int, Query(ge=0, le=1_000_000, description=(
        "how many times the client asked before; poll_after_ms grows with it"
    ))] = 0,
    until: Annotated[Literal["change", "finished"], Query(description=(
        "with wait: answer at the job's next change (default), or only once it finished"
    ))] = "change",
) -> Response:
    ctx, principal = caller
    return await _long_poll(request, ctx, principal, job_id, wait, polls, until)


async def _submit_and_wait(request: Request, ctx: AppState, principal: Principal,
                           sub: JobSubmission, wait: float) -> Response:
    """POST /jobs?wait=: accept the job, then answer its document once it ended or after
    `wait` seconds. The wait is registered before the job is written, so its end cannot
    slip by unseen, and the job is not read before the wait; the job is marked as waited
    for, so its end brings its document along (finish.lua): the request reads nothing
    more. An idempotency key that names an earlier job waits for that one, as a GET
    would."""
    job_id = job_ids.take(1)[0]
    watch = job_watch(request.app.state, ctx)
    async with watch.registered(job_id, finished=True) as waiter:
        doc = (await submit_documents(ctx, principal.user, [sub], [job_id], waited=True))[0]
        if doc.startswith(b'{"id":"' + job_id.encode()):
            await watch.ended_after(waiter, job_id, wait)
            h = waiter.doc or await ctx.redis.hgetall(ctx.keys.job(job_id))
            job = job_from_hash(h) if h.get("state") else await visible_job(
                ctx, principal, job_id, h)
            return await _answer(ctx, job, 0, 202)
    return await _long_poll(request, ctx, principal, orjson.loads(doc)["id"], wait, 0,
                            "finished", 202)


async def _long_poll(request: Request, ctx: AppState, principal: Principal, job_id: str,
                     wait: float, polls: int, until: str, status_code: int = 200) -> Response:
    """The job document, once it changed state (`until="finished"`: once it finished) or
    after `wait` seconds (GET /jobs/{id}?wait=, POST /jobs?wait= for an earlier job)."""
    key = ctx.keys.job(job_id)
    # One HGETALL gives the document and its seq together (the seq is what a wait for a
    # change compares: every transition bumps it).
    h = await ctx.redis.hgetall(key) if wait and _JOB_ID.match(job_id) else None
    job = await visible_job(ctx, principal, job_id, h)
    seq, state, newer = (h or {}).get("seq"), job.state, False
    deadline = monotonic() + wait
    watch = job_watch(request.app.state, ctx)
    while seq is not None and not state.terminal:
        left = deadline - monotonic()
        if left <= 0:
            break
        if until == "finished":  # one wake-up, at the end (not one per transition)
            ended = await watch.ended(job_id, left)
            h = await ctx.redis.hgetall(key)  # the job as it is now, ended or not
            if not h.get("state"):  # gone from Redis: the mirror has it
                job, newer = await visible_job(ctx, principal, job_id, h), False
                break
            seq, state, newer = h.get("seq"), State(h["state"]), True
            if not ended:
                break
            continue
        if not await watch.changed(job_id, seq, left):
            break
        h = await ctx.redis.hgetall(key)
        if h.get("state") and h.get("seq") == seq:  # woken by an event it had seen: wait on
            continue
        job, newer = await visible_job(ctx, principal, job_id, h), False
        break
    if newer and h:
        job = job_from_hash(h)
    return await _answer(ctx, job, polls, status_code)


async def _answer(ctx: AppState, job: Job, polls: int, status_code: int) -> Response:
    """A long-poll's answer: the document; an unfinished job's with its wait detail and
    when to ask again."""
    # a Response of the model's own JSON: FastAPI would validate the Job again first
    if job.state.terminal:
        return Response(job.model_dump_json(), status_code, media_type="application/json")
    detail = await wait_detail(ctx, job)
    after = poll_after_ms(polls)
    job = job.model_copy(update={"wait_detail": detail, "poll_after_ms": after})
    return Response(job.model_dump_json(), status_code, media_type="application/json",
                    headers={"Retry-After": str(math.ceil(after / 1000))})


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
