"""The scheduler loop: small duties run by one `Every` helper under one stop event.
Admission blocks briefly on the submissions stream, so the loop wakes as soon as work
arrives; the other duties run on their own intervals."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common import scripts as sc
from common.clock import monotonic
from common.keys import Keys
from common.logging import get_logger
from common.redis import connect
from common.settings import Settings
from scheduler.context import Context, new_scheduler_id
from scheduler.cron import CronFirer
from scheduler.duties import Duties
from scheduler.recorder import Recorder
from scheduler.settle import Settler

log = get_logger("scheduler")


@dataclass
class Every:
    """Run `duty` at most once per `interval` seconds when `tick()` is called."""

    interval: float
    duty: Callable[[], object]
    last: float = -1e9

    def tick(self, now: float) -> None:
        if now - self.last >= self.interval:
            self.last = now
            self.duty()


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

    @property
    def me(self) -> str:
        return self.ctx.me

    def step(self, block_ms: int | None = None) -> None:
        """One pass of the always-on duties (the loop body; tests call it directly)."""
        self.duties.admit(block_ms)
        self.settler.settle()
        self.duties.dispatch_all()

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
                    duty.tick(now)
                backoff = 0.1
            except redis.RedisError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: create the groups again
                    ready = False
                log.warning("redis error; retrying", error=str(exc), retry_in=backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        if self._recorder_thread:
            self._recorder_thread.join(timeout=10)
        log.info("scheduler stopped", scheduler=self.me)

    def stop(self) -> None:
        self.stop_event.set()
