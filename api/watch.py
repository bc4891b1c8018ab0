"""Waiting for a job to change state without polling Redis: readers of the events
stream and of the finished stream, one of each per API process, wake the requests that
wait on a job (the long-polls of GET /jobs/{id}?wait= and POST /jobs?wait=). A reader
runs only while someone waits for what it reads.

Correctness does not rest on the readers: a waiter compares the job hash's `seq` (bumped
by every transition, in the same Lua call that appends the event) before it sleeps and at
least every RECHECK_S, and the request reads the job again after a wake-up, so a reader
that falls behind or fails only makes an answer later, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError
from starlette.datastructures import State

from api.deps import AppState
from common.clock import monotonic
from common.models import TERMINAL_STATES

log = structlog.get_logger("api")

BLOCK_MS = 1000
READ_COUNT = 1000
RECHECK_S = 2.0
Entry = tuple[str, dict[str, str]]


def xread_entries(reply: Any) -> list[Entry]:
    """XREAD's reply (RESP2 list or RESP3 dict) reduced to its entries."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (items for _, items in reply)
    return [(str(eid), fields) for items in streams for eid, fields in (items or [])]


class Waiter:
    """One request waiting on a job: woken by a reader; `doc` is the job hash that the
    finished entry carried, if it carried one (a job submitted with POST /jobs?wait=)."""

    __slots__ = ("doc", "finished_only", "woken")

    def __init__(self, finished_only: bool) -> None:
        self.woken = asyncio.Event()
        self.finished_only = finished_only
        self.doc: dict[str, str] | None = None


class JobWatch:
    """The waiters of this API process, and up to two readers that wake them: one of the
    events stream (every transition) for waits that answer at any change, one of the
    finished stream (one entry per job that ended) for waits that answer only once the
    job finished, so those cost one wake-up per job rather than one per transition. Each
    reader runs while it has waiters."""

    def __init__(self, ctx: AppState) -> None:
        self.ctx = ctx
        self.waiters: dict[str, set[Waiter]] = {}  # job id → its waiters
        self.wanted = {False: 0, True: 0}  # waiters by finished-only
        self.readers = {False: _Reader(self, ctx.keys.events(), False),
                        True: _Reader(self, ctx.keys.finished(), True)}

    async def changed(self, job_id: str, seq: str | None, timeout: float) -> bool:
        """Wait until the job's `seq` may no longer be `seq`: True when an event of the job
        woke the wait (the caller reads the job again, and compares: the event may be one
        it saw already) or a look at `seq` found it moved; False when `timeout` seconds
        passed or the server is stopping."""
        async def moved() -> bool:
            return await self._field(job_id, "seq") != seq
        async with self.registered(job_id, finished=False) as waiter:
            return await self._wait(waiter, timeout, moved)

    async def ended(self, job_id: str, timeout: float) -> bool:
        """Wait until the job ended: True when its entry in the finished stream woke the
        wait or a look found it in a terminal state (or gone: expired, the mirror has it);
        False when `timeout` seconds passed or the server is stopping. Only the end wakes
        it, so a wait for the end costs one wake-up, not one per transition."""
        async with self.registered(job_id, finished=True) as waiter:
            return await self.ended_after(waiter, job_id, timeout, look=True)

    async def ended_after(self, waiter: Waiter, job_id: str, timeout: float, *,
                          look: bool = False) -> bool:
        """`ended` for a waiter registered (`registered`) before the job was submitted:
        its end cannot come before the reader's position, so the first look is skipped
        (`look=False`): one read of the job less. `waiter.doc` then holds the job hash
        if the finished entry carried it."""
        async def over() -> bool:
            state = await self._field(job_id, "state")
            return state is None or state in TERMINAL_STATES
        return await self._wait(waiter, timeout, over, look=look)

    @contextlib.asynccontextmanager
    async def registered(self, job_id: str, *, finished: bool) -> AsyncIterator[Waiter]:
        """A waiter of the job, registered with the reader of its kind, which runs from
        here on (so every entry after this point reaches the waiter)."""
        waiter = Waiter(finished)
        self.waiters.setdefault(job_id, set()).add(waiter)
        self.wanted[finished] += 1
        try:
            await self.readers[finished].ensure()
            yield waiter
        finally:
            self.wanted[finished] -= 1
            mine = self.waiters.get(job_id, set())
            mine.discard(waiter)
            if not mine:
                self.waiters.pop(job_id, None)

    async def _wait(self, waiter: Waiter, timeout: float, done: Callable[[], Awaitable[bool]],
                    *, look: bool = True) -> bool:
        """Look (`done`) before each sleep, at least every RECHECK_S (`look=False`: not
        before the first): the waiter is registered and the reader runs before the first
        look, so no entry falls between the look and the sleep."""
        deadline = monotonic() + timeout
        while not (look and await done()):
            look = True
            left = deadline - monotonic()
            if left <= 0 or self.ctx.stopping.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, RECHECK_S)):  # no task of its own
                    await waiter.woken.wait()
                return True
        return True

    async def _field(self, job_id: str, name: str) -> str | None:
        value: str | None = await self.ctx.redis.hget(self.ctx.keys.job(job_id), name)
        return value

    def wake(self, job_id: str, terminal: bool, finished_only: bool,
             doc: str | None = None) -> None:
        """An entry of the job was read: wake its waiters of that reader's kind (the
        finished reader wakes every waiter of the job: it ended). `doc`: the job hash
        the finished entry carried (finish.lua), as a JSON [field, value, ...] list."""
        carried = _hash(doc) if doc and finished_only else None
        for waiter in self.waiters.get(job_id, ()):
            if waiter.finished_only == finished_only or terminal:
                waiter.doc = carried
                waiter.woken.set()

    async def close(self) -> None:
        for reader in self.readers.values():
            await reader.close()


def _hash(doc: str) -> dict[str, str] | None:
    """The job hash from a finished entry's `doc` (None if it does not parse: the
    request reads the job itself)."""
    try:
        flat = orjson.loads(doc)
        return dict(zip(flat[::2], flat[1::2], strict=True))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        log.warning("job_watch_bad_doc", size=len(doc))
        return None


class _Reader:
    """XREAD of one stream from its end at start, while the watch has waiters of its kind."""

    def __init__(self, watch: JobWatch, stream: str, finished_only: bool) -> None:
        self.watch = watch
        self.stream = stream
        self.finished_only = finished_only
        self.last = "0-0"
        self.task: asyncio.Task[None] | None = None

    async def ensure(self) -> None:
        """Start the reader if it is not running, at the stream's current end."""
        if self.task is not None and not self.task.done():
            return
        newest = await self.watch.ctx.redis.xrevrange(self.stream, count=1)
        if self.task is not None and not self.task.done():  # another waiter started it
            return
        self.last = str(newest[0][0]) if newest else "0-0"
        self.task = asyncio.create_task(self._read(), name=f"job-watch:{self.stream}")

    async def _read(self) -> None:
        watch, ctx = self.watch, self.watch.ctx
        backoff = 0.1
        while watch.wanted[self.finished_only] and not ctx.stopping.is_set():
            try:
                reply = await ctx.redis.xread({self.stream: self.last}, count=READ_COUNT,
                                              block=BLOCK_MS)
                backoff = 0.1
            except RedisError as exc:
                log.warning("job_watch_failed", stream=self.stream, error=str(exc),
                            retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECHECK_S)
                continue
            for entry_id, fields in xread_entries(reply):
                self.last = entry_id
                job_id = fields.get("job", "")
                if job_id in watch.waiters:
                    watch.wake(job_id, fields.get("state") in TERMINAL_STATES,
                               self.finished_only, fields.get("doc"))

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def job_watch(app_state: State, ctx: AppState) -> JobWatch:
    """This app's JobWatch (made on first use, for the clients of the current lifespan)."""
    watch: JobWatch | None = getattr(app_state, "job_watch", None)
    if watch is None or watch.ctx is not ctx:
        watch = JobWatch(ctx)
        app_state.job_watch = watch
    return watch


async def close_job_watch(app_state: State) -> None:
    """Stop the reader (the app's lifespan calls this as it ends)."""
    watch: JobWatch | None = getattr(app_state, "job_watch", None)
    if watch is not None:
        await watch.close()
