"""/jobs/{id}/logs: a page of the job's log stream, or (follow=true) Server-Sent Events.

SSE frames, one per log line or progress report, then one `end` frame with the final job
document:

    id: <stream entry id>
    event: line
    data: {"stream": "stdout", "time": "2026-01-01T00:00:00.000Z", "text": "..."}

    id: <stream entry id>
    event: progress
    data: {"time": "...", "percent": 40.0, "stage": "compiling", "message": null}

    event: end
    data: {<the job document>}

With `batch=true` (what the SDK and the CLI ask for) each read of the log stream makes ONE
frame for its run of output lines instead of a frame per line (a flood is ~100,000 lines a
second; per-line frames cost the server and the client most of their time), with each
line's own id inside; progress reports keep their own frames, in order:

    id: <the last line's entry id>
    event: lines
    data: {"lines": [{"id": "<entry id>", "stream": "stdout", "time": "...", "text": "..."}, ...]}

A client receives a frame whole or not at all (an SSE event is dispatched at its blank
line), so `Last-Event-ID` = the frame's id resumes after exactly the lines it got; a
client that stops in the middle of a frame can resume after any line's own id.

Progress reports are entries of the same log stream (`s` = 'p', see worker/output.py), so
they come in order with the lines and `Last-Event-ID` resumes across both. Pages
(`follow=false`) hold output lines only; their cursor still moves past progress entries.

A `: ping` comment goes out after ~15 s of silence; `event: error` (data `{"code",
"message"}`) when Redis fails mid-stream. A stream that closes without `end` (Redis
failure, server shutdown) is resumed by reconnecting with `Last-Event-ID`. The worker
writes every line before it finishes a job, so once the job is terminal the stream holds
all its lines. Once the job's log stream has expired from Redis, pages and follows are
served from the SQL mirror's copy (the recorder makes it when the job ends).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from weakref import WeakKeyDictionary

import orjson
import redis.asyncio as aredis
import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy import and_, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, PrincipalDep, StateDep
from api.routes.jobs import ERRORS, read_job, visible_job
from api.watch import Entry
from common.clock import monotonic, ms_to_iso
from common.models import TERMINAL_STATES, Job, LogLine, LogPage
from common.streams import watch_done
from common.tables import LOG_STREAM_NAMES, LogRecord, log_entry

log = structlog.get_logger("api")
router = APIRouter(prefix="/jobs", tags=["logs"])

STREAM_ID_PATTERN = r"^\d{1,20}-\d{1,20}$"
PING_S = 15.0
BLOCK_MS = 1000
WATCH_RENEW_S = 20.0  # a follow renews its done-stream marker (which lives DONE_TTL_S)
READ_COUNT = 1000
_STREAMS = LOG_STREAM_NAMES


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


PROGRESS = "p"  # the `s` of a progress entry


def progress_data(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A progress entry as followers get it (SSE data, WebSocket message)."""
    try:
        percent = float(fields.get("pc") or 0)
    except ValueError:
        percent = 0.0
    return {
        "time": ms_to_iso(_millis(entry_id, fields)),
        "percent": percent,
        "stage": fields.get("st") or None,
        "message": fields.get("m") or None,
    }


# A line frame is assembled from pre-encoded pieces (the same bytes orjson would make of
# {"stream", "time", "text"}): a follower of a flood gets ~100,000 of them a second, and a
# dict, a datetime and a dumps per line would be most of the API's time.
_LINE_HEAD = {code: b'\nevent: line\ndata: {"stream":"' + name.encode() + b'","time":"'
              for code, name in _STREAMS.items()}
_SYSTEM_HEAD = b'\nevent: line\ndata: {"stream":"system","time":"'
_iso_cache: tuple[int, bytes] = (-1, b"")  # lines of one flush share their millisecond


def _iso(ms: int) -> bytes:
    global _iso_cache
    if _iso_cache[0] != ms:
        _iso_cache = (ms, (ms_to_iso(ms) or "").encode())
    return _iso_cache[1]


def line_frame(entry_id: str, fields: dict[str, str]) -> bytes:
    """The SSE frame of one log entry: a `line`, or a `progress` report."""
    stream = fields.get("s", "")
    if stream == PROGRESS:
        data = orjson.dumps(progress_data(entry_id, fields))
        return b"id: " + entry_id.encode() + b"\nevent: progress\ndata: " + data + b"\n\n"
    return b"".join((b"id: ", entry_id.encode(), _LINE_HEAD.get(stream, _SYSTEM_HEAD),
                     _iso(_millis(entry_id, fields)), b'","text":',
                     orjson.dumps(fields.get("l", "")), b"}\n\n"))


_time_cache: tuple[str, str] = ("", "")  # (field t, its ISO text): a run shares its t


def line_item(entry_id: str, fields: dict[str, str]) -> dict[str, str]:
    """One output line as an element of a `lines` frame (a LogLine's JSON, id included)."""
    global _time_cache
    t = fields.get("t", "")
    if _time_cache[0] != t or not t:
        _time_cache = (t, ms_to_iso(_millis(entry_id, fields)) or "")
    return {"id": entry_id, "stream": _STREAMS.get(fields.get("s", ""), "system"),
            "time": _time_cache[1], "text": fields.get("l", "")}


def lines_frames(entries: list[Entry]) -> bytes:
    """The batched SSE frames of log entries (`?batch=true`): each run of output lines is
    ONE `lines` frame, whose `id` is its last line's (a client that got the frame has every
    line up to it; each line still carries its own id), and each progress entry its own
    `progress` frame in its place, so the order holds."""
    out: list[bytes] = []
    run: list[dict[str, str]] = []
    for entry_id, fields in entries:
        if fields.get("s") == PROGRESS:
            if run:
                out.append(_lines_frame(run))
                run = []
            out.append(line_frame(entry_id, fields))
        else:
            run.append(line_item(entry_id, fields))
    if run:
        out.append(_lines_frame(run))
    return b"".join(out)


def _lines_frame(run: list[dict[str, str]]) -> bytes:
    return (b"id: " + run[-1]["id"].encode() + b"\nevent: lines\ndata: "
            + orjson.dumps({"lines": run}) + b"\n\n")


def end_frame(job: Job | None) -> bytes:
    data = job.model_dump_json().encode() if job is not None else b"null"
    return b"event: end\ndata: " + data + b"\n\n"


def error_frame(code: str, message: str) -> bytes:
    return b"event: error\ndata: " + orjson.dumps({"code": code, "message": message}) + b"\n\n"


PING_FRAME = b": ping\n\n"


# -- reading the stream ---------------------------------------------------------------------
#
# `tail` is the one reader of a job's log for every live consumer (SSE here, the WebSocket
# in api/ws.py): it yields what a follower needs and leaves the framing to the caller.


@dataclass(frozen=True, slots=True)
class Lines:
    """Log entries, in order, each after the previous one yielded."""

    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class StateSeen:
    """The job's state, yielded first and then each time its event seq moves."""

    state: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Quiet:
    """Nothing new for PING_S seconds (a keep-alive is due)."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The job is over and every line was yielded: its final document (None if gone)."""

    job: Job | None


TailItem = Lines | StateSeen | Quiet | Ended
STATE_FIELDS = ("state", "seq", "attempt", "wait_reason", "worker")


def _mirror_entries(engine: Engine, job_id: str, after: str | None, limit: int) -> list[Entry]:
    """Up to `limit` lines after entry id `after` from the SQL mirror's copy of the log."""
    stmt = select(LogRecord).where(LogRecord.job_id == job_id)
    if after and after != "0-0":
        ms, _, seq = after.partition("-")
        stmt = stmt.where(or_(col(LogRecord.entry_ms) > int(ms),
                              and_(col(LogRecord.entry_ms) == int(ms),
                                   col(LogRecord.entry_seq) > int(seq or 0))))
    stmt = stmt.order_by(col(LogRecord.entry_ms), col(LogRecord.entry_seq)).limit(limit)
    with Session(engine) as session:
        return [log_entry(rec) for rec in session.exec(stmt)]


async def read_entries(ctx: AppState, job_id: str, after: str | None, limit: int) -> list[Entry]:
    """Up to `limit` lines after `after` (None: from the first): from the job's log stream,
    or from the SQL mirror once that stream has expired."""
    key = ctx.keys.log(job_id)
    page = await ctx.redis.xrange(key, min=f"({after}" if after else "-", max="+", count=limit)
    if page or await ctx.redis.exists(key):
        return [(str(eid), fields) for eid, fields in page]
    return await run_in_threadpool(_mirror_entries, ctx.engine, job_id, after, limit)


_raw_readers: WeakKeyDictionary[aredis.Redis, aredis.Redis] = WeakKeyDictionary()


def raw_reader(client: aredis.Redis) -> aredis.Redis:
    """A client on `client`'s connection pool whose XREAD replies are left as the parser
    made them (lists of [id, [field, value, …]]): redis-py's reply callback runs several
    Python calls per entry, a cost a follower of a flood pays ~100,000 times a second."""
    raw = _raw_readers.get(client)
    if raw is None:
        raw = aredis.Redis(connection_pool=client.connection_pool)
        raw.response_callbacks.pop("XREAD", None)
        _raw_readers[client] = raw
    return raw


def _log_entries(reply: Any, key: str) -> tuple[list[Entry], str | None]:
    """A raw XREAD reply over the log stream and the job's done stream (RESP2 list or
    RESP3 dict): (the log stream's entries, the id of the last done-stream entry read, None
    when that stream did not answer)."""
    if not reply:
        return [], None
    entries: list[Entry] = []
    done = None
    for name, items in (reply.items() if isinstance(reply, dict) else reply):
        if name == key:  # a line has 3 fields (s, t, l): a dict display, else any length
            entries = [(eid, {f[0]: f[1], f[2]: f[3], f[4]: f[5]} if len(f) == 6
                        else dict(zip(f[::2], f[1::2], strict=True)))
                       for eid, f in (items or [])]
        elif items:
            done = items[-1][0]
    return entries, done


async def _watch_done(ctx: AppState, done_key: str) -> str:
    """Register this follower on the job's done stream (`watch_done`); the id to read
    that stream after."""
    pipe = ctx.redis.pipeline(transaction=False)
    watch_done(pipe, done_key)
    marker, _ttl = await pipe.execute()
    return str(marker)


async def _rest(ctx: AppState, job_id: str, last: str) -> AsyncIterator[list[Entry]]:
    """Everything after `last`, in bounded reads, without blocking."""
    while page := await read_entries(ctx, job_id, last, READ_COUNT):
        last = page[-1][0]
        yield page


async def tail(
    ctx: AppState, job_id: str, after: str, gone: Callable[[], Awaitable[bool]]
) -> AsyncIterator[TailItem]:
    """A job's log after entry id `after`, live: lines as they come, its state when it
    changes, `Quiet` after PING_S without news, then every remaining line and `Ended` once
    the job is terminal (a job whose hash is gone counts as over). Stops quietly when the
    server stops or `gone()` says the consumer left; RedisError propagates.

    The blocking read also watches the job's done stream (every path to a terminal state
    writes it, `mark_done` in _lib.lua, once a follower has created it: `watch_done`, done
    again before each read of the state and renewed every WATCH_RENEW_S), so a job that
    ends without a last line ends the follow at once, not after the block. Right after a
    full page the state is not read (a flood costs one round trip per page): if the job
    ended meanwhile, its done stream answers the next read at once, and the state is read
    after that."""
    key, last, quiet_since, seen = ctx.keys.log(job_id), after, monotonic(), None
    done_key = ctx.keys.done(job_id)
    streams = {key: last, done_key: "0-0"}
    full_page, watched_at = False, float("-inf")
    while not ctx.stopping.is_set() and not await gone():
        if not full_page:
            if monotonic() - watched_at >= WATCH_RENEW_S:  # before the state is read
                streams[done_key], watched_at = await _watch_done(ctx, done_key), monotonic()
            values = await ctx.redis.hmget(ctx.keys.job(job_id), list(STATE_FIELDS))
            h = {name: v for name, v in zip(STATE_FIELDS, values, strict=True) if v is not None}
            if h.get("state") and h.get("seq") != seen:
                seen = h.get("seq")
                yield StateSeen(h["state"], h)
            if not h.get("state") or h["state"] in TERMINAL_STATES:
                async for page in _rest(ctx, job_id, last):
                    last = page[-1][0]
                    yield Lines(page)
                yield Ended(await read_job(ctx, job_id))
                return
        streams[key] = last
        got, done_id = _log_entries(
            await raw_reader(ctx.redis).xread(streams, count=READ_COUNT, block=BLOCK_MS), key)
        full_page = len(got) >= READ_COUNT
        if done_id is not None:  # an end, or another follower's marker: look at the state
            streams[done_key], full_page = done_id, False
        if got:
            last, quiet_since = got[-1][0], monotonic()
            yield Lines(got)
        elif done_id is not None:
            continue  # the state check at the top ends it
        elif monotonic() - quiet_since >= PING_S:
            quiet_since = monotonic()
            yield Quiet()


async def follow(request: Request, ctx: AppState, job_id: str, after: str,
                 batch: bool = False) -> AsyncIterator[bytes]:
    """The SSE body: lines as they come (a `line` frame each, or with `batch` a `lines`
    frame per read), then `end` once the job is terminal."""
    try:
        async with aclosing(tail(ctx, job_id, after, request.is_disconnected)) as items:
            async for item in items:
                if isinstance(item, Lines):
                    if batch:
                        yield lines_frames(item.entries)
                    else:
                        yield b"".join(line_frame(eid, fields) for eid, fields in item.entries)
                elif isinstance(item, Quiet):
                    yield PING_FRAME
                elif isinstance(item, Ended):
                    yield end_frame(item.job)
    except RedisError as exc:
        log.warning("log_follow_failed", job_id=job_id, error=str(exc))
        yield error_frame("redis_unavailable", f"Redis is unavailable: {exc}")


# -- the route ------------------------------------------------------------------------------


async def log_page(ctx: AppState, job_id: str, cursor: str | None, limit: int) -> LogPage:
    entries = await read_entries(ctx, job_id, cursor, limit)
    lines = [to_line(eid, fields) for eid, fields in entries if fields.get("s") != PROGRESS]
    more = len(entries) == limit  # a page may hold fewer lines than entries read
    return LogPage(job_id=job_id, lines=lines, next_cursor=entries[-1][0] if more else None)


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
    batch: Annotated[bool, Query(
        description="follow: one `lines` event per read (many lines) instead of a `line` "
                    "event per line")] = False,
) -> LogPage | StreamingResponse:
    await visible_job(ctx, principal, job_id)
    if not follow_:
        return await log_page(ctx, job_id, cursor, limit)
    resume = last_event_id or after or "0-0"
    log.info("log_follow", job_id=job_id, after=resume)
    return StreamingResponse(
        follow(request, ctx, job_id, resume, batch),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
