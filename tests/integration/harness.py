"""An in-process cluster for testing scheduling rules against the real Lua scripts: a
scheduler's duties driven step by step, and scripted workers that start and finish jobs
exactly as worker/ does (start.lua, finish.lua), so tests decide when each job ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from scheduler.service import Scheduler

MAXLEN = 100_000


@dataclass
class Running:
    job_id: str
    queue: str
    token: str
    worker: str


@dataclass
class Harness:
    r: redis.Redis
    keys: Keys
    settings: Settings
    schedulers: list[Scheduler] = field(default_factory=list)
    running: dict[str, Running] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scripts = sc.Scripts(self.r)
        if not self.schedulers:
            self.add_scheduler()

    def add_scheduler(self) -> Scheduler:
        s = Scheduler(self.settings.model_copy(update={"capacity_refresh_s": 0.0,
                                                       "recorder": False}), self.r)
        s.duties.ensure_groups()
        self.schedulers.append(s)
        return s

    # -- the API's part ---------------------------------------------------------------
    def submit(self, owner: str = "alice", **spec: Any) -> str:
        spec.setdefault("command", ["true"])
        sub = JobSubmission.model_validate(spec)
        job_id = new_job_id()
        out = self.scripts.run(sc.submit(
            self.keys, job_id, owner, submission_fields(sub, self.settings.stale_after_s),
            events_maxlen=MAXLEN, idempotency_key=sub.idempotency_key,
            max_active=self.settings.max_active_per_user, max_queue=self.settings.max_queue_size,
        ))
        assert int(out[0]) >= 0, out
        return str(out[1])

    def cancel(self, job_id: str, by: str = "alice") -> Any:
        queue, host = self.r.hmget(self.keys.job(job_id), "queue", "host")
        return self.scripts.run(sc.cancel(self.keys, job_id, queue or "default", host=host or None,
                                          by=by, events_maxlen=MAXLEN, ttl_s=3600))

    # -- the scheduler's part -----------------------------------------------------------
    def step(self, scheduler: int = 0, rounds: int = 3) -> None:
        """Run every duty of one scheduler a few times (settling may enqueue more)."""
        s = self.schedulers[scheduler]
        for _ in range(rounds):
            s.duties.admit(block_ms=None)
            s.duties.promote_due()
            s.settler.settle()
            s.settler.expire_stale()
            s.duties.reap()
            s.duties.dispatch_all()

    # -- the workers' part --------------------------------------------------------------
    def worker(self, worker_id: str, slots: int, queues: str = "default", cpu: float = 64,
               memory_mb: int = 65536, gpu: int = 0) -> None:
        """Register (or refresh) a worker's heartbeat, with its running jobs' tokens."""
        mine = [(r.job_id, r.token) for r in self.running.values() if r.worker == worker_id]
        fields = {"queues": queues, "slots": slots, "cpu": str(cpu), "memory_mb": memory_mb,
                  "gpu": gpu, "hostname": "test", "pid": 1}
        self.scripts.run(sc.heartbeat(self.keys, worker_id, mine, fields, ttl_ms=60_000))

    def take(self, worker_id: str, queue: str = "default", count: int = 100) -> list[str]:
        """Read what the dispatch stream holds for this worker and start it."""
        stream = self.keys.dispatch(queue)
        ensure_group(self.r, stream, GROUP_WORKERS)
        got = self.r.xreadgroup(GROUP_WORKERS, worker_id, {stream: ">"}, count=count)
        entries = [(eid, f["id"]) for _s, items in got or [] for eid, f in items]
        if not entries:
            return []
        started = self.scripts.run(sc.start(self.keys, queue, entries, worker=worker_id,
                                            events_maxlen=MAXLEN))
        ids = []
        for (token, _), (job_id, attempt, *_rest) in zip(entries, started, strict=True):
            if int(attempt) > 0:
                self.running[job_id] = Running(job_id, queue, token, worker_id)
                ids.append(job_id)
        return ids

    def finish(self, job_id: str, state: str = "completed", exit_code: int | None = 0) -> Any:
        run = self.running.pop(job_id)
        outcome = sc.Outcome(state, exit_code, reason="" if state == "completed" else "exit_code")
        return self.scripts.run(sc.finish(self.keys, job_id, run.queue, run.token, outcome,
                                          worker=run.worker, retry_delay_ms=0,
                                          events_maxlen=MAXLEN, ttl_s=3600))

    def lose_worker(self, worker_id: str) -> list[str]:
        """The worker dies: its heartbeat key goes; its jobs are left for the reaper."""
        self.r.delete(self.keys.worker(worker_id))
        lost = [j for j, r in self.running.items() if r.worker == worker_id]
        for job_id in lost:
            del self.running[job_id]
        return lost

    # -- reading ------------------------------------------------------------------------
    def state(self, job_id: str) -> str | None:
        return self.r.hget(self.keys.job(job_id), "state")

    def field(self, job_id: str, name: str) -> str | None:
        return self.r.hget(self.keys.job(job_id), name)

    def running_ids(self) -> list[str]:
        return sorted(self.running)
