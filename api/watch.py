"""Waiting for a job to change state without polling Redis: one reader of the events
stream per API process wakes the requests that wait on a job (the long-poll of
GET /jobs/{id}?wait=). The reader runs only while someone waits.

Correctness does not rest on the reader: a waiter compares the job hash's `seq` (bumped
by every transition, in the same Lua call that appends the event) before it sleeps, after
every wake-up and at least every RECHECK_S, so a reader that falls behind or fails only
makes an answer later, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

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


class JobWatch:
    def __init__(self, ctx: AppState) -> None:
        self.ctx = ctx
        # job id → its waiters: each an event, and whether only a terminal state wakes it
        self.waiters: dict[str, dict[asyncio.Event, bool]] = {}
        self.last = "0-0"
        self.task: asyncio.Task[None] | None = None

    async def _ensure_reader(self) -> None:
        """Start the reader if it is not running, at the events stream's current end."""
        if self.task is not None and not self.task.done():
            return
        newest = await self.ctx.redis.xrevrange(self.ctx.keys.events(), count=1)
        if self.task is not None and not self.task.done():  # another waiter started it
            return
        self.last = str(newest[0][0]) if newest else "0-0"
        self.task = asyncio.create_task(self._read(), name="job-watch")

    async def _read(self) -> None:
        backoff = 0.1
        while self.waiters and not self.ctx.stopping.is_set():
            try:
                reply = await self.ctx.redis.xread({self.ctx.keys.events(): self.last},
                                                   count=READ_COUNT, block=BLOCK_MS)
                backoff = 0.1
            except RedisError as exc:
                log.warning("job_watch_failed", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECHECK_S)
                continue
            for entry_id, fields in xread_entries(reply):
                self.last = entry_id
                waiters = self.waiters.get(fields.get("job", ""))
                if not waiters:
                    continue
                final = fields.get("state") in TERMINAL_STATES
                for waiter, final_only in waiters.items():
                    if final or not final_only:
                        waiter.set()

    async def _seq(self, job_id: str) -> str | None:
        seq: str | None = await self.ctx.redis.hget(self.ctx.keys.job(job_id), "seq")
        return seq

    async def changed(self, job_id: str, seq: str | None, timeout: float, *,
                      finished: bool = False) -> bool:
        """Wait until the job's `seq` is no longer `seq` (True) or `timeout` seconds passed
        or the server is stopping (False). With `finished`, only an event of a terminal
        state wakes the wait early (a long-poll `until=finished` would otherwise read the
        job at each of its transitions); the RECHECK_S look at `seq` still runs, so an
        answer may come at a transition, and the caller checks the state itself."""
        woken = asyncio.Event()
        self.waiters.setdefault(job_id, {})[woken] = finished
        deadline = monotonic() + timeout
        try:
            await self._ensure_reader()  # before the first look, so no event falls between
            while await self._seq(job_id) == seq:
                left = deadline - monotonic()
                if left <= 0 or self.ctx.stopping.is_set():
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(left, RECHECK_S))
                woken.clear()
            return True
        finally:
            mine = self.waiters.get(job_id, {})
            mine.pop(woken, None)
            if not mine:
                self.waiters.pop(job_id, None)

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
