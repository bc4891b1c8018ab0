"""Follow-up of jobs that ended, and expiry of jobs that waited too long.

Every terminal transition (finish, cancel, expire, poison, a dependency failing) appends
the job to the settle stream. A scheduler then hands its host to the first waiter, tells
each dependent (which may fail in turn, appending itself: the failure runs down the
chain), and finally acknowledges the entry, counting the job off its owner's active jobs.
Each step is one idempotent Lua call, so an entry processed twice changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from common import scripts as sc
from common.hosts import hand_on
from common.keys import GROUP_SCHEDULERS
from common.logging import get_logger
from scheduler.context import Context

log = get_logger("scheduler")

@dataclass
class Settler:
    ctx: Context

    def settle(self) -> int:
        """Process new settle entries (every loop: this is the host hand-off)."""
        return self._process(self._read(">"))

    def recover(self) -> int:
        """Process entries left unacknowledged: this scheduler's own (after an error) and
        those of schedulers that died."""
        return self._process(self._read("0") or self._claim())

    def _process(self, items: list[tuple[str, dict[str, str]]]) -> int:
        c = self.ctx
        for entry_id, f in items:
            if f and "id" in f:
                self.settle_one(entry_id, f)
            else:
                c.client.xack(c.keys.settle(), GROUP_SCHEDULERS, entry_id)
        return len(items)

    def settle_one(self, entry_id: str, f: dict[str, str]) -> None:
        c = self.ctx
        job_id = f["id"]
        if f.get("host"):
            self.hand_on(f["host"], job_id)
        self._resolve_dependents(job_id, f.get("state", "failed"))
        c.scripts.run(sc.settle(c.keys, entry_id, job_id, f.get("owner", "")))

    def hand_on(self, host: str, released: str) -> str:
        """Let `released` go of `host` and grant it to the first waiter."""
        c = self.ctx
        return hand_on(c.client, c.scripts, c.keys, host, released)

    def _resolve_dependents(self, job_id: str, state: str) -> None:
        c = self.ctx
        dependents = sorted(c.client.smembers(c.keys.dependents(job_id)))
        if not dependents:
            return
        rows = c.job_fields(dependents, "queue", "host")
        pipe = c.client.pipeline(transaction=False)
        for dep, (queue, host) in zip(dependents, rows, strict=True):
            c.scripts.run(sc.resolve(
                c.keys, dep, queue or "default", host or None, job_id, state,
                events_maxlen=c.maxlen, priority_step_ms=c.step_ms, by=c.me,
            ), pipe)
        pipe.execute()

    def _read(self, start: str) -> list[tuple[str, dict[str, str]]]:
        c = self.ctx
        got = c.client.xreadgroup(GROUP_SCHEDULERS, c.me, {c.keys.settle(): start}, count=100)
        return [item for _s, items in got or [] for item in items]

    def _claim(self) -> list[tuple[str, dict[str, str]]]:
        c = self.ctx
        _next, items, _deleted = c.client.xautoclaim(
            c.keys.settle(), GROUP_SCHEDULERS, c.me,
            min_idle_time=int(c.settings.reclaim_idle_s * 1000), start_id="0-0", count=100,
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
