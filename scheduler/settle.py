"""Follow-up of jobs that ended, and expiry of jobs that waited too long.

Every terminal transition (finish, cancel, expire, poison, a dependency failing) appends
the job to the settle stream. A scheduler then hands its host to the first waiter, tells
each dependent (which may fail in turn, appending itself: the failure runs down the
chain), and finally acknowledges the entry, counting the job off its owner's active jobs.

A whole batch of entries is settled by one settle.lua call: a job with no host waiters
and no dependents (the common case) costs no read at all. The script hands back the
entries it could not finish (a host with waiters, dependents to tell) with what to read;
the caller reads the waiters' and dependents' queues in one pipeline and calls it again
for those. Every step is idempotent, so an entry processed twice changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from common import scripts as sc
from common.hosts import GRANT_TRIES, hand_on
from common.keys import GROUP_SCHEDULERS
from common.logging import get_logger
from scheduler.context import Context

log = get_logger("scheduler")

Entry = tuple[str, dict[str, str]]


@dataclass
class Settler:
    ctx: Context

    def settle(self) -> int:
        """Process new settle entries (tests and tools; the loop reads them along with the
        submissions: scheduler/service.py)."""
        return self.process(self._read(">"))

    def recover(self) -> int:
        """Process entries left unacknowledged: this scheduler's own (after an error) and
        those of schedulers that died."""
        return self.process(self._read("0") or self._claim())

    def process(self, items: list[Entry]) -> int:
        """Settle these entries: one round trip when none needs a read."""
        todo = self.plan(items)
        if todo:
            self.follow_up(todo, self.run_batch(todo))
        return len(items)

    def plan(self, items: list[Entry]) -> list[sc.Settlement]:
        """The settlements of these entries; malformed ones are acknowledged and dropped."""
        c = self.ctx
        todo, bad = [], []
        for entry_id, f in items:
            if f and f.get("id"):
                todo.append(sc.Settlement(entry_id, f["id"], f.get("state") or "failed",
                                          f.get("owner", ""), f.get("host") or ""))
            else:
                bad.append(entry_id)
        if bad:
            c.client.xack(c.keys.settle(), GROUP_SCHEDULERS, *bad)
        return todo

    def call(self, todo: list[sc.Settlement]) -> sc.Call:
        c = self.ctx
        return sc.settle(c.keys, todo, events_maxlen=c.maxlen, priority_step_ms=c.step_ms,
                         by=c.me)

    def run_batch(self, todo: list[sc.Settlement]) -> list[Any]:
        """One settle.lua call for the batch; the rows of the entries it left."""
        call = self.call(todo)
        return list(self.ctx.execute(lambda batch: batch.script(call))[0])

    def follow_up(self, todo: list[sc.Settlement], left: list[Any]) -> None:
        """Entries settle.lua left: read the waiter at each host's head and each job's
        dependents (one pipeline), then settle those again; a proposal that went stale
        meanwhile is read again, a few times; what is still left stays pending and is
        taken up by `recover`."""
        c = self.ctx
        for _ in range(GRANT_TRIES):
            if not left:
                return
            again: list[sc.Settlement] = []
            reads: list[tuple[sc.Settlement, str, list[str]]] = []
            pipe = c.client.pipeline(transaction=False)
            for index, need_host, head, need_deps, members in left:
                s = todo[int(index) - 1]
                waiter = str(head) if int(need_host) and head else ""
                deps = sorted(members) if int(need_deps) else []
                if waiter:
                    pipe.hget(c.keys.job(waiter), "queue")
                for dep in deps:
                    pipe.hmget(c.keys.job(dep), "queue", "host")
                reads.append((s, waiter, deps))
            answers = iter(pipe.execute() if len(pipe) else [])
            for s, waiter, deps in reads:
                queue = (next(answers) or "default") if waiter else "default"
                told = s.dependents
                if deps:
                    rows = [next(answers) for _ in deps]
                    told = [(d, q or "default", h or None) for d, (q, h) in zip(deps, rows,
                                                                              strict=True)]
                again.append(replace(s, waiter=waiter, waiter_queue=queue, dependents=told))
            todo = again
            left = self.run_batch(todo)
        if left:
            log.warning("settle entries left for a later pass", entries=len(left))

    def hand_on(self, host: str, released: str) -> str:
        """Let `released` go of `host` and grant it to the first waiter."""
        c = self.ctx
        return hand_on(c.client, c.scripts, c.keys, host, released)

    def _read(self, start: str) -> list[Entry]:
        c = self.ctx
        got = c.client.xreadgroup(GROUP_SCHEDULERS, c.me, {c.keys.settle(): start},
                                  count=c.settings.admit_batch)
        return [item for _s, items in got or [] for item in items]

    def _claim(self) -> list[Entry]:
        c = self.ctx
        _next, items, _deleted = c.client.xautoclaim(
            c.keys.settle(), GROUP_SCHEDULERS, c.me,
            min_idle_time=int(c.settings.reclaim_idle_s * 1000), start_id="0-0",
            count=c.settings.admit_batch,
        )
        return list(items)

    def expire_stale(self) -> int:
        """Queued jobs past their stale_after end as expired (Redis decides)."""
        c = self.ctx
        candidates = c.due(c.keys.stale())
        if not candidates:
            return 0
        return int(c.scripts.run(sc.expire(
            c.keys, candidates, events_maxlen=c.maxlen, ttl_s=c.settings.job_ttl_s, by=c.me,
        )))
