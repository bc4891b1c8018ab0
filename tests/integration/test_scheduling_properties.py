"""Property-based proof of the scheduling rules: hypothesis drives random submissions,
scheduler steps (two schedulers on one Redis), starts, completions, failures, cancels
and worker losses through the real Lua scripts on a real server, and checks after every
step that:

- never two jobs hold or run on one host at once;
- per host, jobs start in submission order;
- a scheduler step dispatches best score first: nothing left queued scores better than
  what it just dispatched (unless it waits for resources);
- the resource ledger never goes negative nor above the live capacity;
- in the end every job ends in exactly one terminal state, with one terminal event.
"""

from __future__ import annotations

import uuid
from collections import Counter

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.keys import Keys
from common.models import TERMINAL_STATES
from common.redis import connect
from common.settings import Settings
from tests.integration.harness import Harness

WORKERS = {"w1": 3, "w2": 2}
CPU_PER_WORKER = 4.0
HOSTS = [None, None, "h1", "h2", "h3"]
TERMINAL = {s.value for s in TERMINAL_STATES}
ACTIVE = ("dispatched", "running")


class Scheduling(RuleBasedStateMachine):
    url = ""  # bound by the test (the session's server)
    base: Settings

    @initialize()
    def start(self) -> None:
        prefix = "{p" + uuid.uuid4().hex[:12] + "}"
        self.r: redis.Redis = connect(self.url)
        self.h = Harness(self.r, Keys(prefix), self.base.model_copy(update={"prefix": prefix}))
        self.h.add_scheduler()
        self.jobs: list[str] = []
        self.host_of: dict[str, str] = {}
        self.plain_host_jobs: set[str] = set()  # host jobs without dependencies
        self.started: dict[str, list[str]] = {}
        self.alive = set(WORKERS)
        for w in WORKERS:
            self.h.worker(w, WORKERS[w], cpu=CPU_PER_WORKER)

    # -- actions ------------------------------------------------------------------
    @rule(priority=st.sampled_from(["critical", "high", "normal", "low"]),
          host=st.sampled_from(HOSTS), retries=st.integers(0, 1),
          cpu=st.sampled_from([0, 0, 1, 3]), dep=st.integers(-3, 40))
    def submit(self, priority: str, host: str | None, retries: int, cpu: int,
               dep: int) -> None:
        spec: dict[str, object] = {"priority": priority, "retries": retries,
                                   "retry_delay": 0, "resources": {"cpu": cpu}}
        if host:
            spec["host"] = host
        if 0 <= dep < len(self.jobs):
            spec["depends_on"] = [{"id": self.jobs[dep], "on": "success"}]
        job = self.h.submit(**spec)
        self.jobs.append(job)
        if host:
            self.host_of[job] = host
            if "depends_on" not in spec:
                self.plain_host_jobs.add(job)

    @rule(which=st.integers(0, 1))
    def step(self, which: int) -> None:
        for w in self.alive:
            self.h.worker(w, WORKERS[w], cpu=CPU_PER_WORKER)
        self.one_round(which)

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def take(self, worker: str) -> None:
        if worker in self.alive:
            for job in self.h.take(worker):
                host = self.host_of.get(job)
                if host and job not in self.started.setdefault(host, []):
                    self.started[host].append(job)

    @precondition(lambda self: bool(self.h.running))
    @rule(pick=st.integers(0, 1000), ok=st.booleans())
    def finish(self, pick: int, ok: bool) -> None:
        job = self.h.running_ids()[pick % len(self.h.running)]
        self.h.finish(job, "completed" if ok else "failed", 0 if ok else 1)

    @precondition(lambda self: bool(self.jobs))
    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick: int) -> None:
        job = self.jobs[pick % len(self.jobs)]
        if self.h.cancel(job) == "cancelling" and job in self.h.running:
            self.h.finish(job, "cancelled", None)  # its worker kills it and says so

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def lose_worker(self, worker: str) -> None:
        if worker in self.alive:
            self.h.lose_worker(worker)
            self.alive.discard(worker)
        else:
            self.revive(worker)

    def revive(self, worker: str) -> None:
        """A new process comes up in the dead one's place. A real one has a new worker id;
        these reuse the name, so the dead consumer's entries are reaped first (else the
        reaper would take the newcomer's heartbeat for the dead one's, and its jobs would
        stay `running` forever: a flaw of the model, not of the scheduler)."""
        duties = self.h.schedulers[0].duties
        duties.queues_refreshed_at = -1e9  # its queue names may be a second old
        duties.reap()
        self.alive.add(worker)

    # -- one scheduler round, checking dispatch order ----------------------------------
    def one_round(self, which: int) -> None:
        before = set(self.in_state("dispatched"))
        s = self.h.schedulers[which]
        s.duties.admit(block_ms=None)
        s.duties.promote_due()
        s.settler.settle()
        s.duties.reap()
        s.duties.dispatch_all()
        new = [j for j in self.in_state("dispatched") if j not in before]
        if new:
            best_left = [float(sc) for j, sc in self.r.zrange(
                self.h.keys.queue("default"), 0, -1, withscores=True)
                if self.h.field(j, "wait_reason") != "resources"]
            worst_sent = max(float(self.h.field(j, "score") or 0) for j in new)
            assert not best_left or worst_sent <= min(best_left)

    def in_state(self, *states: str) -> list[str]:
        return [j for j in self.jobs if self.h.state(j) in states]

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def one_job_per_host(self) -> None:
        if not hasattr(self, "h"):
            return
        per_host = Counter(self.host_of[j] for j in self.in_state(*ACTIVE)
                           if j in self.host_of)
        assert all(n <= 1 for n in per_host.values()), per_host
        for host, n in per_host.items():
            if n:
                holder = self.r.get(self.h.keys.host(host))
                assert holder in self.in_state(*ACTIVE)

    @invariant()
    def hosts_start_in_submission_order(self) -> None:
        if not hasattr(self, "h"):
            return
        for starts in self.started.values():
            plain = [j for j in starts if j in self.plain_host_jobs]
            seqs = [int(self.h.field(j, "sub_seq") or 0) for j in plain]
            assert seqs == sorted(seqs), starts

    @invariant()
    def ledger_within_capacity(self) -> None:
        if not hasattr(self, "h"):
            return
        cpu = float(self.r.hget(self.h.keys.ledger(), "cpu") or 0)
        assert -1e-9 <= cpu <= CPU_PER_WORKER * len(WORKERS) + 1e-9

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        try:
            self.drain()
            for job in self.jobs:
                assert self.h.state(job) in TERMINAL, (job, self.h.state(job))
            ends = Counter(f["job"] for _, f in self.r.xrange(self.h.keys.events())
                           if f["state"] in TERMINAL)
            assert all(ends[j] == 1 for j in self.jobs), ends
            assert float(self.r.hget(self.h.keys.ledger(), "cpu") or 0) == 0
        finally:
            for key in self.r.scan_iter(match=f"{self.h.keys.prefix}*", count=1000):
                self.r.delete(key)
            self.r.close()

    def drain(self) -> None:
        """Every worker back, everything run to completion (bounded)."""
        for worker in set(WORKERS) - self.alive:
            self.revive(worker)
        for _ in range(200):
            for w in WORKERS:
                self.h.worker(w, WORKERS[w], cpu=CPU_PER_WORKER)
            self.one_round(0)
            for w in WORKERS:
                self.take(w)
            for job in self.h.running_ids():
                self.h.finish(job)
            if not self.in_state("pending", "queued", "dispatched", "running",
                                 "retrying"):
                return



def test_scheduling_invariants_hold_under_random_operations(
    valkey_url: str, settings: Settings
) -> None:
    bound = type("BoundScheduling", (Scheduling,), {"url": valkey_url, "base": settings})
    run_state_machine_as_test(bound, settings=settings_for_ci())


def settings_for_ci() -> settings:
    return settings(max_examples=25, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], database=None)
