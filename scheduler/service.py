"""The scheduler loop: small duties run by one `Every` helper under one stop event.

Each pass reads new submissions and new settle entries in one XREADGROUP (the same group
on both streams). When the last pass found nothing it blocks there, so the loop wakes as
soon as a job is submitted or one ends that needs its follow-up (a host, dependents; or
any job when workers do not dispatch for themselves: finish.lua then appends every end to
the settle stream), and a freed slot is refilled at once instead of on the server's next
tick. With worker dispatch on (the default) a worker refills its own freed slots and
settles its plain jobs itself, so a drain wakes this loop only for submissions. A pass that read
something reads the next batch ahead, without blocking, in its last round trip; one that
queued jobs some other way (a host granted, dependents enqueued, a periodic duty) is
followed by one that does not block. The pass admits, settles and reads every queue's
free slots and best jobs in one round trip, and dispatches in one more. The block
is bounded (`scheduler_block_ms`; in practice the server's hz tick, 100 ms at hz 10), so
the periodic duties run on their own intervals."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from common import scripts as sc
from common.clock import monotonic
from common.keys import GROUP_SCHEDULERS, Keys
from common.logging import get_logger
from common.redis import connect
from common.scripts import Batch
from common.settings import Settings
from scheduler.context import Context, new_scheduler_id
from scheduler.cron import CronFirer
from scheduler.duties import Duties
from scheduler.loopstats import LoopStats
from scheduler.recorder import Recorder
from scheduler.settle import Settler

log = get_logger("scheduler")


@dataclass
class Every:
    """Run `duty` at most once per `interval` seconds when `tick()` is called."""

    interval: float
    duty: Callable[[], object]
    last: float = -1e9

    def tick(self, now: float) -> object:
        if now - self.last >= self.interval:
            self.last = now
            return self.duty()
        return None


class Scheduler:
    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or connect(settings.redis_url)
        self.ctx = Context(settings, self.client, sc.Scripts(self.client),
                           Keys(settings.prefix), new_scheduler_id())
        self.duties = Duties(self.ctx)
        self.settler = Settler(self.ctx)
        self.cron = CronFirer(self.ctx)
        self.stop_event = threading.Event()
        self.recorder = Recorder(settings, self.client) if settings.recorder else None
        self._recorder_thread: threading.Thread | None = None
        self.loop_stats = LoopStats()
        self.read_at = 0.0  # monotonic: when the last pass's read returned
        self.streams = {self.ctx.keys.submissions(): ">", self.ctx.keys.settle(): ">"}
        self.ahead: Any = None  # what the last pass read ahead for the next one
        self.no_wait = False  # the next pass must not block (jobs were queued meanwhile)

    @property
    def me(self) -> str:
        return self.ctx.me

    def step(self, block_ms: int | None = None) -> int:
        """One pass of the always-on duties (the loop body; tests call it directly): take
        new submissions and settle entries (those the last pass read ahead, else read now,
        waiting up to `block_ms` while there are none; None: the setting, 0: not at all),
        admit and settle them and dispatch. A pass that read something reads the next
        batch ahead, without waiting, in its last round trip. Returns the entries taken
        plus the jobs dispatched (0: there was nothing to do)."""
        c = self.ctx
        got, self.ahead = self.ahead, None
        if not got:
            block = c.settings.scheduler_block_ms if block_ms is None else block_ms
            if self.no_wait:  # the last pass or a periodic duty queued jobs: dispatch them
                block, self.no_wait = 0, False
            got = c.client.xreadgroup(GROUP_SCHEDULERS, c.me, self.streams,
                                      count=c.settings.admit_batch, block=block or None)
        self.read_at = monotonic()
        subs, ended = [], []
        for stream, items in got or []:
            (subs if stream == c.keys.submissions() else ended).extend(items)
        admit, plain, with_deps = self.duties.plan_admit(subs)
        if with_deps:
            self.duties.admit_with_deps(with_deps)
        todo = self.settler.plan(ended)
        before = [call for call in (admit, self.settler.call(todo) if todo else None) if call]
        read_ahead = self._read_ahead if subs or ended else None
        sent, answers, self.ahead = self.duties.dispatch_after(before, read_ahead, plain)
        if todo and answers[-1]:  # some hosts had waiters, some jobs dependents
            self.settler.follow_up(todo, answers[-1])
            self.no_wait = True  # what they enqueued is dispatched by the next pass
        return len(subs) + len(ended) + sent

    def _read_ahead(self, batch: Batch) -> None:
        batch.xreadgroup(GROUP_SCHEDULERS, self.me, self.streams,
                         count=self.settings.admit_batch)

    def run(self) -> None:
        log.info("scheduler starting", scheduler=self.me, redis=self.settings.redis_url)
        if self.recorder:
            self._recorder_thread = threading.Thread(
                target=self.recorder.run, args=(self.stop_event,), name="recorder", daemon=True
            )
            self._recorder_thread.start()
        s = self.settings
        periodic = [
            Every(0.05, self.duties.promote_due),
            Every(0.5, self.settler.expire_stale),
            Every(1.0, self.cron.fire_due),
            Every(5.0, self.duties.reclaim_submissions),
            Every(5.0, self.settler.recover),
            Every(s.reap_interval_s, self.duties.reap),
            Every(1.0, self.publish_loop_stats),
        ]
        ready, backoff = False, 0.1
        while not self.stop_event.is_set():
            try:
                if not ready:
                    self.duties.ensure_groups()
                    ready = True
                self.step()
                now = monotonic()
                for duty in periodic:
                    if duty.tick(now):  # it moved jobs: the next pass must not wait
                        self.no_wait = True
                self.loop_stats.record(monotonic() - self.read_at)
                backoff = 0.1
            except redis.RedisError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: create the groups again
                    ready = False
                log.warning("redis error; retrying", error=str(exc), retry_in=backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        if self.ahead:  # read, so pending on this scheduler: handle it before leaving
            try:
                self.step(0)
            except redis.RedisError as exc:
                log.warning("entries left pending for another scheduler", error=str(exc))
        if self._recorder_thread:
            self._recorder_thread.join(timeout=10)
        log.info("scheduler stopped", scheduler=self.me)

    def publish_loop_stats(self) -> None:
        self.loop_stats.publish(self.client, self.ctx.keys, self.me)

    def stop(self) -> None:
        self.stop_event.set()
