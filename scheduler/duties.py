"""The scheduler's duties: each reads what it needs and makes its change with one Lua
call, so any number of schedulers can run side by side and one killed at any instant
leaves nothing half done."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

import redis

from common import scripts as sc
from common.clock import monotonic
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.logging import get_logger
from common.settings import Settings
from common.streams import ensure_group

log = get_logger("scheduler")


def new_scheduler_id() -> str:
    return f"sched-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class Capacity:
    """Slots of the live workers, by queue; refreshed at most every `capacity_refresh_s`."""

    by_queue: dict[str, int] = field(default_factory=dict)
    refreshed_at: float = -1e9


@dataclass
class Duties:
    settings: Settings
    client: redis.Redis
    scripts: sc.Scripts
    keys: Keys
    me: str
    capacity: Capacity = field(default_factory=Capacity)
    queue_names: list[str] = field(default_factory=list)
    queues_refreshed_at: float = -1e9

    @property
    def step_ms(self) -> int:
        return int(self.settings.priority_step_s * 1000)

    # -- admit --------------------------------------------------------------------
    def admit(self, block_ms: int | None = None) -> int:
        """Read a batch of submissions (blocking briefly) and admit them in one call."""
        got = self.client.xreadgroup(
            GROUP_SCHEDULERS, self.me, {self.keys.submissions(): ">"},
            count=self.settings.admit_batch,
            block=self.settings.scheduler_block_ms if block_ms is None else block_ms,
        )
        return self._admit_entries([item for _stream, items in got or [] for item in items])

    def reclaim_submissions(self) -> int:
        """Take over submissions another scheduler read but never admitted (it died)."""
        _next, items, _deleted = self.client.xautoclaim(
            self.keys.submissions(), GROUP_SCHEDULERS, self.me,
            min_idle_time=int(self.settings.reclaim_idle_s * 1000), start_id="0-0",
            count=self.settings.admit_batch,
        )
        return self._admit_entries(items)

    def _admit_entries(self, items: list[tuple[str, dict[str, str]]]) -> int:
        entries = [(eid, f["id"], f.get("q") or "default") for eid, f in items if f and "id" in f]
        if not entries:
            return 0
        return int(self.scripts.run(sc.admit(
            self.keys, entries, events_maxlen=self.settings.events_maxlen,
            priority_step_ms=self.step_ms, by=self.me,
        )))

    # -- delayed ------------------------------------------------------------------
    def promote_due(self) -> int:
        """Move due jobs from the delayed set into their queues (Redis decides due-ness)."""
        now_ms = self._redis_now_ms()
        ids = self.client.zrangebyscore(self.keys.delayed(), "-inf", now_ms, start=0,
                                        num=self.settings.dispatch_batch)
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "queue")
        queues = pipe.execute()
        candidates = [(j, q or "default") for j, q in zip(ids, queues, strict=True)]
        return int(self.scripts.run(sc.promote_due(
            self.keys, candidates, events_maxlen=self.settings.events_maxlen,
            priority_step_ms=self.step_ms, by=self.me,
        )))

    # -- reap ---------------------------------------------------------------------
    def reap(self) -> int:
        """Requeue the jobs that workers whose heartbeat expired left pending."""
        self._refresh_queue_names()
        return sum(self._reap_queue(queue) for queue in self.queue_names)

    def _reap_queue(self, queue: str) -> int:
        stream = self.keys.dispatch(queue)
        try:
            consumers = [c["name"] for c in self.client.xinfo_consumers(stream, GROUP_WORKERS)]
        except redis.ResponseError:
            return 0  # no group yet: no worker ever read this queue
        if not consumers:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for name in consumers:
            pipe.exists(self.keys.worker(name))
        alive = pipe.execute()
        dead = [name for name, ok in zip(consumers, alive, strict=True) if not ok]
        return sum(self._reap_consumer(queue, name) for name in dead)

    def _reap_consumer(self, queue: str, consumer: str) -> int:
        stream = self.keys.dispatch(queue)
        pending = self.client.xpending_range(stream, GROUP_WORKERS, min="-", max="+",
                                             count=self.settings.dispatch_batch,
                                             consumername=consumer)
        if not pending:
            # its pending list is empty, so deleting the consumer drops nothing
            self.client.xgroup_delconsumer(stream, GROUP_WORKERS, consumer)
            return 0
        ids = [p["message_id"] for p in pending]
        claimed = self.client.xclaim(stream, GROUP_WORKERS, self.me, min_idle_time=0,
                                     message_ids=ids)
        entries = [(eid, f["id"]) for eid, f in claimed if f and "id" in f]
        gone = set(ids) - {eid for eid, _ in entries}
        if gone:  # entries deleted under us (finished meanwhile): just drop them
            self.client.xack(stream, GROUP_WORKERS, *gone)
        if not entries:
            return 0
        requeued, ended = self.scripts.run(sc.reclaim(
            self.keys, queue, entries, max_deliveries=self.settings.max_deliveries,
            events_maxlen=self.settings.events_maxlen, ttl_s=self.settings.job_ttl_s, by=self.me,
        ))
        log.warning("reclaimed jobs of a dead worker", worker=consumer, queue=queue,
                    requeued=requeued, ended=ended)
        return int(requeued) + int(ended)

    # -- dispatch -----------------------------------------------------------------
    def dispatch_all(self) -> int:
        """For every queue with live capacity, hand out its best jobs up to the free slots."""
        self._refresh_capacity()
        self._refresh_queue_names()
        sent = 0
        for queue in self.queue_names:
            slots = self.capacity.by_queue.get(queue, 0)
            if slots > 0:
                sent += self._dispatch_queue(queue, slots)
        return sent

    def _dispatch_queue(self, queue: str, slots: int) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.keys.dispatch(queue))
        pipe.zrange(self.keys.queue(queue), 0, min(slots, self.settings.dispatch_batch) - 1)
        in_flight, candidates = pipe.execute()
        free = slots - int(in_flight)
        if free <= 0 or not candidates:
            return 0
        return int(self.scripts.run(sc.dispatch(
            self.keys, queue, candidates[:free], capacity=slots,
            events_maxlen=self.settings.events_maxlen, by=self.me,
        )))

    def _refresh_capacity(self, force: bool = False) -> None:
        age = monotonic() - self.capacity.refreshed_at
        if not force and age < self.settings.capacity_refresh_s:
            return
        now_ms = self._redis_now_ms()
        alive_after = now_ms - int(self.settings.worker_ttl_s * 1000)
        ids = self.client.zrangebyscore(self.keys.workers(), alive_after, "+inf")
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(self.keys.worker(worker_id), "queues", "slots")
        by_queue: dict[str, int] = {}
        for queues, slots in pipe.execute() if ids else []:
            if queues is None or slots is None:
                continue  # its hash expired: the worker is gone
            for q in queues.split(","):
                by_queue[q] = by_queue.get(q, 0) + int(slots)
        self.client.zremrangebyscore(self.keys.workers(), "-inf", f"({alive_after}")
        self.capacity = Capacity(by_queue, monotonic())

    def _refresh_queue_names(self) -> None:
        if monotonic() - self.queues_refreshed_at < 1.0:
            return
        self.queue_names = sorted(self.client.smembers(self.keys.queues()))
        self.queues_refreshed_at = monotonic()

    def _redis_now_ms(self) -> int:
        sec, usec = self.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    def ensure_groups(self) -> None:
        ensure_group(self.client, self.keys.submissions(), GROUP_SCHEDULERS)
