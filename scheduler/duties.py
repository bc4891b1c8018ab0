"""The scheduler's core duties: admit, promote due jobs, dispatch, reap dead workers.
Each reads what it needs and makes its change with one Lua call, so any number of
schedulers can run side by side and one killed at any instant leaves nothing half done.
(Settling ended jobs and expiring stale ones: scheduler/settle.py; cron: scheduler/cron.py.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis

from common import scripts as sc
from common.clock import monotonic
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS
from common.logging import get_logger
from common.models import JobSubmission
from common.scripts import Batch
from common.streams import ensure_group
from scheduler.context import Context

log = get_logger("scheduler")

Entry = tuple[str, dict[str, str]]


@dataclass
class Cluster:
    """What the live workers offer, by queue; refreshed at most every capacity_refresh_s."""

    by_queue: dict[str, sc.Capacity] = field(default_factory=dict)
    refreshed_at: float = -1e9


@dataclass
class Duties:
    ctx: Context
    cluster: Cluster = field(default_factory=Cluster)
    queue_names: list[str] = field(default_factory=list)
    queues_refreshed_at: float = -1e9
    fresh_queues: set[str] = field(default_factory=set)  # seen in submissions, maybe not read

    def ensure_groups(self) -> None:
        ensure_group(self.ctx.client, self.ctx.keys.submissions(), GROUP_SCHEDULERS)
        ensure_group(self.ctx.client, self.ctx.keys.settle(), GROUP_SCHEDULERS)

    # -- admit --------------------------------------------------------------------
    def admit(self, block_ms: int | None = None) -> int:
        """Read a batch of submissions and admit them. `block_ms`: how long to wait while
        there are none (None: the setting; 0: not at all, as `Scheduler.step` takes it;
        XREADGROUP's own BLOCK 0 would wait forever)."""
        c = self.ctx
        block = c.settings.scheduler_block_ms if block_ms is None else block_ms
        got = c.client.xreadgroup(
            GROUP_SCHEDULERS, c.me, {c.keys.submissions(): ">"}, count=c.settings.admit_batch,
            block=block or None,
        )
        return self._admit_entries([item for _stream, items in got or [] for item in items])

    def reclaim_submissions(self) -> int:
        """Take over submissions another scheduler read but never admitted (it died)."""
        c = self.ctx
        _next, items, _deleted = c.client.xautoclaim(
            c.keys.submissions(), GROUP_SCHEDULERS, c.me,
            min_idle_time=int(c.settings.reclaim_idle_s * 1000), start_id="0-0",
            count=c.settings.admit_batch,
        )
        return self._admit_entries(items)

    def _admit_entries(self, items: list[Entry]) -> int:
        plain, _, with_deps = self.plan_admit(items)
        admitted = 0
        if plain:
            admitted += int(self.ctx.scripts.run(plain))
        if with_deps:
            admitted += self.admit_with_deps(with_deps)
        return admitted

    def plan_admit(
        self, items: list[Entry],
    ) -> tuple[sc.Call | None, list[sc.Admission], list[sc.Admission]]:
        """The admit.lua call for the entries without dependencies (None if there are
        none), those entries, and the entries with dependencies (admitted by
        `admit_with_deps`)."""
        plain: list[sc.Admission] = []
        with_deps: list[sc.Admission] = []
        for entry_id, f in items:
            if not f or "id" not in f:
                continue
            a = sc.Admission(entry_id, f["id"], f.get("q") or "default", f.get("h") or None)
            (with_deps if f.get("d", "0") != "0" else plain).append(a)
        # a new queue is dispatched from in this very pass (the queue-names set, which
        # admit.lua adds it to, is read only once a second)
        new = {a.queue for a in (*plain, *with_deps)} - set(self.queue_names)
        if new:
            self.fresh_queues |= new
            self.queue_names = sorted({*self.queue_names, *new})
        if not plain:
            return None, plain, with_deps
        return sc.admit(self.ctx.keys, plain, events_maxlen=self.ctx.maxlen,
                        priority_step_ms=self.ctx.step_ms, by=self.ctx.me), plain, with_deps

    def admit_with_deps(self, entries: list[sc.Admission]) -> int:
        c = self.ctx
        specs = c.job_fields([a.job_id for a in entries], "spec")
        calls = []
        for a, (spec,) in zip(entries, specs, strict=True):
            sub = JobSubmission.model_validate(orjson.loads(spec or '{"command": "true"}'))
            deps = [(d.id, d.on) for d in sub.dependencies()]
            calls.append(sc.depend(c.keys, a, deps, events_maxlen=c.maxlen,
                                   priority_step_ms=c.step_ms, by=c.me))
        got = c.execute(lambda batch: [batch.script(call) for call in calls])
        return sum(1 for r in got if r != "skipped")

    # -- delayed ------------------------------------------------------------------
    def promote_due(self) -> int:
        """Move due jobs from the delayed set to where they wait (Redis decides due-ness)."""
        c = self.ctx
        candidates = c.due(c.keys.delayed())
        if not candidates:
            return 0
        return int(c.scripts.run(sc.promote_due(
            c.keys, candidates, events_maxlen=c.maxlen, priority_step_ms=c.step_ms, by=c.me,
        )))

    # -- dispatch -----------------------------------------------------------------
    def dispatch_all(self) -> int:
        """For every queue with live capacity, hand out its best jobs up to the free slots."""
        return self.dispatch_after(())[0]

    def dispatch_after(
        self, before: Sequence[sc.Call], then: Callable[[Batch], object] | None = None,
        admitted: Sequence[sc.Admission] = (),
    ) -> tuple[int, list[Any], Any]:
        """For every queue with live capacity, hand out its best jobs up to the free slots:
        one round trip reads every queue's jobs in flight and best candidates (after the
        script calls `before`), one more sends the dispatch calls of the queues with free
        slots. dispatch.lua counts the free slots again itself, so the dispatch stream never
        holds more than the free slots. `then` queues one more command on the last round
        trip (the loop's next read), when there is a last round trip: a pass with nothing
        to dispatch leaves it to the loop's own read. Jobs `admitted` by a call of `before`
        are dispatched in the first round trip already, as far as they are the head of
        their queue (dispatch.lua's head-checked mode): a job submitted to an idle cluster
        goes out one round trip sooner. Returns (jobs dispatched, the answers of `before`,
        the answer of `then` or None)."""
        c = self.ctx
        self._refresh_cluster()
        self.refresh_queue_names()
        queues = [(q, cap) for q in self.queue_names
                  if (cap := self.cluster.by_queue.get(q)) and cap.slots > 0]
        if not queues and not before and then is None:
            return 0, [], None

        early = self._early_dispatch(admitted, dict(queues))

        def read(batch: Batch) -> None:
            for call in (*before, *early):
                batch.script(call)
            for queue, capacity in queues:
                batch.xlen(c.keys.dispatch(queue))
                # a few more than the slots, so jobs whose resources don't fit can be passed
                window = min(max(capacity.slots * 2, 64), c.settings.dispatch_batch)
                batch.zrange(c.keys.queue(queue), 0, window - 1)

        if not queues:  # nothing to dispatch: one round trip
            got = c.execute(lambda batch: (read(batch), then and then(batch)))
            return 0, got[:len(before)], got[-1] if then else None
        got = c.execute(read)
        answers, got = got[:len(before)], got[len(before):]
        dispatched = sum(int(s) for s, _held in got[:len(early)])
        got = got[len(early):]
        calls = []
        for i, (queue, capacity) in enumerate(queues):
            in_flight, candidates = got[2 * i], got[2 * i + 1]
            if capacity.slots - int(in_flight) > 0 and candidates:
                calls.append(sc.dispatch(c.keys, queue, candidates, capacity=capacity,
                                         events_maxlen=c.maxlen, by=c.me))
        if not calls:  # nothing to send: the loop's next (blocking) read does the read-ahead
            return dispatched, answers, None

        def send(batch: Batch) -> None:
            for call in calls:
                batch.script(call)
            if then:
                then(batch)

        sent = c.execute(send)
        later = sent.pop() if then else None
        return dispatched + sum(int(s) for s, _held in sent), answers, later

    def _early_dispatch(self, admitted: Sequence[sc.Admission],
                        capacities: dict[str, sc.Capacity]) -> list[sc.Call]:
        """dispatch.lua calls (head-checked, on the published capacity) for the jobs just
        admitted, by queue, no more of them than the queue's slots."""
        c = self.ctx
        fresh: dict[str, list[str]] = {}
        for a in admitted:
            if a.queue in capacities and not a.host:
                fresh.setdefault(a.queue, []).append(a.job_id)
        return [sc.dispatch(c.keys, q, ids[:capacities[q].slots], capacity=None,
                            events_maxlen=c.maxlen, by=c.me) for q, ids in fresh.items()]

    def _refresh_cluster(self) -> None:
        c = self.ctx
        if monotonic() - self.cluster.refreshed_at < c.settings.capacity_refresh_s:
            return
        alive_after = c.redis_now_ms() - int(c.settings.worker_ttl_s * 1000)
        ids = c.client.zrangebyscore(c.keys.workers(), alive_after, "+inf")
        pipe = c.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(c.keys.worker(worker_id), "queues", "slots", "cpu", "memory_mb", "gpu")
        workers = [w for w in (pipe.execute() if ids else []) if w[0] is not None]
        self.cluster = Cluster(self._capacities(workers), monotonic())
        # published for the workers' own dispatch (dispatch.lua); it outlives a scheduler
        # that stops by a worker TTL at most, as its count of the workers would
        pipe = c.client.pipeline(transaction=False)
        pipe.zremrangebyscore(c.keys.workers(), "-inf", f"({alive_after}")
        ttl_ms = int(c.settings.worker_ttl_s * 1000)
        for queue, cap in self.cluster.by_queue.items():
            pipe.hset(c.keys.capacity(queue), mapping=asdict(cap))
            pipe.pexpire(c.keys.capacity(queue), ttl_ms)
        pipe.execute()

    def _capacities(self, workers: list[list[str | None]]) -> dict[str, sc.Capacity]:
        s = self.ctx.settings
        by_queue: dict[str, list[tuple[int, float, int, int]]] = {}
        for queues, slots, cpu, mem, gpu in workers:
            res = (int(slots or 0), float(cpu or 0), int(mem or 0), int(gpu or 0))
            for q in (queues or "").split(","):
                by_queue.setdefault(q, []).append(res)
        out = {}
        for q, rows in by_queue.items():
            slots = sum(r[0] for r in rows)
            out[q] = sc.Capacity(
                # with dispatch_ahead, the budget is the slots plus that fraction more
                slots=slots + int(slots * s.dispatch_ahead),
                cpu=sum(r[1] for r in rows) * s.overcommit - s.reserve_cpu,
                memory_mb=int(sum(r[2] for r in rows) * s.overcommit) - s.reserve_memory_mb,
                gpu=sum(r[3] for r in rows),
                max_cpu=max(r[1] for r in rows), max_memory_mb=max(r[2] for r in rows),
                max_gpu=max(r[3] for r in rows),
            )
        return out

    def refresh_queue_names(self) -> None:
        if monotonic() - self.queues_refreshed_at < 1.0:
            return
        known = set(self.ctx.client.smembers(self.ctx.keys.queues()))
        self.fresh_queues -= known
        self.queue_names = sorted(known | self.fresh_queues)
        self.queues_refreshed_at = monotonic()

    # -- reap ---------------------------------------------------------------------
    def reap(self) -> int:
        """Requeue the jobs that workers whose heartbeat expired left pending."""
        self.refresh_queue_names()
        return sum(self._reap_queue(queue) for queue in self.queue_names)

    def _reap_queue(self, queue: str) -> int:
        c = self.ctx
        stream = c.keys.dispatch(queue)
        try:
            consumers = [x["name"] for x in c.client.xinfo_consumers(stream, GROUP_WORKERS)]
        except redis.ResponseError:
            return 0  # no group yet: no worker ever read this queue
        if not consumers:
            return 0
        pipe = c.client.pipeline(transaction=False)
        for name in consumers:
            pipe.exists(c.keys.worker(name))
        alive = pipe.execute()
        dead = [name for name, ok in zip(consumers, alive, strict=True) if not ok]
        return sum(self._reap_consumer(queue, name) for name in dead)

    def _reap_consumer(self, queue: str, consumer: str) -> int:
        c = self.ctx
        stream = c.keys.dispatch(queue)
        pending = c.client.xpending_range(stream, GROUP_WORKERS, min="-", max="+",
                                          count=c.settings.dispatch_batch, consumername=consumer)
        if not pending:
            # its pending list is empty, so deleting the consumer drops nothing
            c.client.xgroup_delconsumer(stream, GROUP_WORKERS, consumer)
            return 0
        ids = [p["message_id"] for p in pending]
        claimed = c.client.xclaim(stream, GROUP_WORKERS, c.me, min_idle_time=0, message_ids=ids)
        entries = [(eid, f["id"]) for eid, f in claimed if f and "id" in f]
        gone = set(ids) - {eid for eid, _ in entries}
        if gone:  # entries deleted under us (finished meanwhile): just drop them
            c.client.xack(stream, GROUP_WORKERS, *gone)
        if not entries:
            return 0
        requeued, ended = c.scripts.run(sc.reclaim(
            c.keys, queue, entries, max_deliveries=c.settings.max_deliveries,
            events_maxlen=c.maxlen, ttl_s=c.settings.job_ttl_s, by=c.me,
        ))
        log.warning("reclaimed jobs of a dead worker", worker=consumer, queue=queue,
                    requeued=requeued, ended=ended)
        return int(requeued) + int(ended)
