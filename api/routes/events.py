"""/jobs/{id}/events: every transition of a job (sequence number, time, state, by whom).

The SQL mirror (written by the recorder, normally well under a second behind) holds the
history. When the job hash says there are newer transitions than the mirror has, the most
recent part of the events stream is searched for them (at most SCAN_LIMIT entries, newest
first); whatever is still missing makes the answer `complete: false`.

A progress event (progress.lua: stored with state `running` and a `progress` field, so a
mirror applying it keeps the job running) is shown with state `progress`, and its data
(`attempt`, `progress`, `stage`).

A job with a `callback_url` also shows its callback's outcome, right after the terminal
transition it reports: state `callback_pending`, `callback_delivered` or `callback_failed`
(gave up), by `recorder`, with the url, attempts, last status code and error.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import ERRORS, visible_job
from common.models import JobEvent, JobEvents
from common.tables import CallbackRecord, EventRecord

router = APIRouter(prefix="/jobs", tags=["jobs"])

SCAN_PAGE = 500
SCAN_LIMIT = 2000
EVENT_FIELDS = {"job", "seq", "state", "at", "by"}


def _mirrored(engine: Engine, job_id: str) -> tuple[list[EventRecord], list[CallbackRecord]]:
    events = select(EventRecord).where(EventRecord.job_id == job_id).order_by(
        col(EventRecord.seq))
    callbacks = select(CallbackRecord).where(CallbackRecord.job_id == job_id)
    with Session(engine) as session:
        return list(session.exec(events).all()), list(session.exec(callbacks).all())


def _callback_event(rec: CallbackRecord) -> JobEvent:
    """A callback's outcome, as an entry after the terminal transition it reports."""
    data: dict[str, Any] = {"url": rec.url, "attempts": rec.attempts}
    if rec.status_code is not None:
        data["status_code"] = rec.status_code
    if rec.error:
        data["error"] = rec.error
    return _event(rec.seq, rec.updated_at, f"callback_{rec.status}", "recorder", data)


def _event(seq: int, at: int, state: str, by: str, data: dict[str, Any]) -> JobEvent:
    if state == "running" and "progress" in data:  # a report, not a transition
        state = "progress"
    return JobEvent(seq=seq, time=datetime.fromtimestamp(at / 1000, tz=UTC), state=state, by=by,
                    data=data)


async def _recent(ctx: AppState, job_id: str, missing: set[int]) -> list[JobEvent]:
    """The missing transitions found in the newest SCAN_LIMIT entries of the events stream."""
    found: list[JobEvent] = []
    top, scanned = "+", 0
    while missing and scanned < SCAN_LIMIT:
        page = await ctx.redis.xrevrange(ctx.keys.events(), max=top, min="-", count=SCAN_PAGE)
        for _eid, f in page:
            seq = int(f.get("seq") or 0)
            if f.get("job") == job_id and seq in missing:
                missing.discard(seq)
                data = {k: v for k, v in f.items() if k not in EVENT_FIELDS}
                found.append(_event(seq, int(f.get("at") or 0), f.get("state", ""),
                                    f.get("by", ""), data))
        scanned += len(page)
        if len(page) < SCAN_PAGE:
            break
        top = f"({page[-1][0]}"
    return found


@router.get("/{job_id}/events", response_model=JobEvents, summary="A job's transitions",
            responses=ERRORS)
async def get_events(job_id: str, ctx: StateDep, principal: PrincipalDep) -> JobEvents:
    await visible_job(ctx, principal, job_id)
    records, callbacks = await run_in_threadpool(_mirrored, ctx.engine, job_id)
    events = [_event(r.seq, r.at, r.state, r.by, orjson.loads(r.data or "{}")) for r in records]
    newest = int(await ctx.redis.hget(ctx.keys.job(job_id), "seq") or 0)
    have = {e.seq for e in events}
    missing = {seq for seq in range(1, newest + 1) if seq not in have}
    if missing:
        events.extend(await _recent(ctx, job_id, missing))
    events.extend(_callback_event(rec) for rec in callbacks)
    events.sort(key=lambda e: (e.seq, e.state.startswith("callback_")))
    return JobEvents(job_id=job_id, events=events, complete=not missing)
