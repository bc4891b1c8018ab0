"""/jobs/{id}/logs: a page of the job's log stream, or (follow=true) Server-Sent Events.

SSE frames, one per log line, then one `end` frame with the final job document:

    id: <stream entry id>
    event: line
    data: {"stream": "stdout", "time": "2026-01-01T00:00:00.000Z", "text": "..."}

    event: end
    data: {<the job document>}

A `: ping` comment goes out after ~15 s of silence; `event: error` (data `{"code",
"message"}`) when Redis fails mid-stream. A stream that closes without `end` (Redis
failure, server shutdown) is resumed by reconnecting with `Last-Event-ID`. The worker
writes every line before it finishes a job, so once the job is terminal the stream holds
all its lines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import ERRORS, read_job, visible_job
from common.clock import monotonic, ms_to_iso
from common.models import TERMINAL_STATES, Job, LogLine, LogPage

log = structlog.get_logger("api")
router = APIRouter(prefix="/jobs", tags=["logs"])

STREAM_ID_PATTERN = r"^\d{1,20}-\d{1,20}$"
PING_S = 15.0
BLOCK_MS = 1000
READ_COUNT = 1000
_STREAMS = {"o": "stdout", "e": "stderr", "x": "system"}
Entry = tuple[str, dict[str, str]]


def _millis(entry_id: str, fields: dict[str, str]) -> int:
    t = fields.get("t", "")
    return int(t) if t.isdigit() else int(entry_id.split("-", 1)[0])


def to_line(entry_id: str, fields: dict[str, str]) -> LogLine:
    return LogLine(
        id=entry_id,
        stream=_STREAMS.get(fields.get("s", ""), "system"),  # type: ignore[arg-type]
        time=datetime.fromtimestamp(_millis(entry_id, fields) / 1000, tz=UTC),
        text=fields.get("l", ""),
    )


# -- SSE frames -----------------------------------------------------------------------------


def line_frame(entry_id: str, fields: dict[str, str]) -> bytes:
    data = orjson.dumps(
        {
            "stream": _STREAMS.get(fields.get("s", ""), "system"),
            "time": ms_to_iso(_millis(entry_id, fields)),
            "text": fields.get("l", ""),
        }
    )
    return b"id: " + entry_id.encode() + b"\nevent: line\ndata: " + data + b"\n\n"


def end_frame(job: Job | None) -> bytes:
    data = job.model_dump_json().encode() if job is not None else b"null"
    return b"event: end\ndata: " + data + b"\n\n"


def error_frame(code: str, message: str) -> bytes:
    return b"event: error\ndata: " + orjson.dumps({"code": code, "message": message}) + b"\n\n"


PING_FRAME = b": ping\n\n"


# -- reading the stream ---------------------------------------------------------------------


def _entries(reply: Any) -> list[Entry]:
    """XREAD's reply (RESP2 list or RESP3 dict) reduced to its entries."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (items for _, items in reply)
    return [(str(eid), fields) for items in streams for eid, fields in (items or [])]


async def _drain(ctx: AppState, key: str, last: str) -> AsyncIterator[bytes]:
    """Everything after `last`, in bounded reads, without blocking."""
    while True:
        page = await ctx.redis.xrange(key, min=f"({last}", max="+", count=READ_COUNT)
        if not page:
            return
        last = page[-1][0]
        yield b"".join(line_frame(eid, fields) for eid, fields in page)


async def _finished(ctx: AppState, job_id: str) -> tuple[bool, Job | None]:
    """(job is over, its document). A job whose hash is gone counts as over."""
    state = await ctx.redis.hget(ctx.keys.job(job_id), "state")
    if state and state not in TERMINAL_STATES:
        return False, None
    return True, await read_job(ctx, job_id)


async def follow(request: Request, ctx: AppState, job_id: str, after: str) -> AsyncIterator[bytes]:
    """The SSE body: lines as they come, then `end` once the job is terminal."""
    key, last, quiet_since = ctx.keys.log(job_id), after, monotonic()
    try:
        while not ctx.stopping.is_set() and not await request.is_disconnected():
            got = _entries(await ctx.redis.xread({key: last}, count=READ_COUNT, block=BLOCK_MS))
            if got:
                last = got[-1][0]
                quiet_since = monotonic()
                yield b"".join(line_frame(eid, fields) for eid, fields in got)
                if len(got) == READ_COUNT:
                    continue  # a backlog: keep reading before asking about the job
            done, job = await _finished(ctx, job_id)
            if done:
                async for frames in _drain(ctx, key, last):
                    yield frames
                yield end_frame(job)
                return
            if monotonic() - quiet_since >= PING_S:
                quiet_since = monotonic()
                yield PING_FRAME
    except RedisError as exc:
        log.warning("log_follow_failed", job_id=job_id, error=str(exc))
        yield error_frame("redis_unavailable", f"Redis is unavailable: {exc}")


# -- the route ------------------------------------------------------------------------------


async def log_page(ctx: AppState, job_id: str, cursor: str | None, limit: int) -> LogPage:
    start = f"({cursor}" if cursor else "-"
    entries = await ctx.redis.xrange(ctx.keys.log(job_id), min=start, max="+", count=limit)
    lines = [to_line(eid, fields) for eid, fields in entries]
    more = len(lines) == limit
    return LogPage(job_id=job_id, lines=lines, next_cursor=lines[-1].id if more else None)


SSE_DOC: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "A LogPage, or with follow=true a text/event-stream",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}


@router.get(
    "/{job_id}/logs", response_model=LogPage, summary="A job's output", responses=SSE_DOC
)
async def get_logs(
    job_id: str,
    request: Request,
    ctx: StateDep,
    principal: PrincipalDep,
    cursor: Annotated[
        str | None, Query(pattern=STREAM_ID_PATTERN, description="last line id seen (exclusive)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow_: Annotated[bool, Query(alias="follow", description="stream as SSE")] = False,
    after: Annotated[
        str | None, Query(pattern=STREAM_ID_PATTERN, description="follow: resume after this id")
    ] = None,
    last_event_id: Annotated[str | None, Header(pattern=STREAM_ID_PATTERN)] = None,
) -> LogPage | StreamingResponse:
    await visible_job(ctx, principal, job_id)
    if not follow_:
        return await log_page(ctx, job_id, cursor, limit)
    resume = last_event_id or after or "0-0"
    log.info("log_follow", job_id=job_id, after=resume)
    return StreamingResponse(
        follow(request, ctx, job_id, resume),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
