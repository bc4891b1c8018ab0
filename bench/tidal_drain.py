"""Drain throughput: N no-op python jobs queued (submitted through the API and admitted
by the running scheduler, the recorder caught up), then worker process(es) started; a job
counts as done only when the SQL mirror (TIDAL_DATA_DIR/tidal.db, table `jobs`) has it in
a terminal state.

Rates (one figure each):
- `jobs_per_s`: N / (harness time when the mirror had all N terminal − first `started_at`)
  — the headline: the whole path, recorder included;
- `redis_jobs_per_s`: N / (last `finished_at` − first `started_at`), Redis' clock — what
  the workers sustain, without the recorder's lag.
Worker start-up (imports, ~0.7 s) is outside both windows, as for the peers."""

from __future__ import annotations

import sqlite3
import statistics
import time
from typing import Any

from bench.env import TERMINAL, Tidal, per_job, wait_until
from bench.tidal_submit import rest_batches

POLL_S = 0.02
UNFINISHED = ("pending", "queued", "dispatched", "running", "retrying")


class Mirror:
    """Read-only view of the SQL mirror, on one connection (WAL: each query sees the
    newest commit). The harness shares the machine with what it measures, so its polls
    must cost little: `unfinished` looks only at this run's unfinished rows (through the
    state index), never at the finished rows of earlier runs."""

    def __init__(self, t: Tidal) -> None:
        self.path = t.dir / "tidal.db"
        self._con: sqlite3.Connection | None = None

    def _q(self, sql: str, *args: Any) -> Any:
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                        isolation_level=None)
        return self._con.execute(sql, args).fetchone()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def count(self, since_ms: int, states: tuple[str, ...]) -> int:
        """This run's rows in these states. With terminal states this reads every finished
        row since the mark (through the created_at index): for the end, not for polling."""
        marks = ",".join("?" * len(states))
        index = "INDEXED BY ix_jobs_created_at " if set(states) & set(TERMINAL) else ""
        return int(self._q(f"SELECT count(*) FROM jobs {index}WHERE created_at >= ? AND "
                           f"state IN ({marks})", since_ms, *states)[0])

    def unfinished(self, since_ms: int) -> int:
        """This run's rows not yet in a terminal state (cheap: a poll while draining)."""
        return self.count(since_ms, UNFINISHED)

    def window(self, since_ms: int) -> tuple[int, int]:
        row = self._q("SELECT min(started_at), max(finished_at) FROM jobs WHERE created_at >= ?",
                      since_ms)
        return int(row[0]), int(row[1])


def redis_ms(t: Tidal) -> int:
    sec, usec = t.r.time()
    return int(sec) * 1000 + int(usec) // 1000


def queue_jobs(t: Tidal, n: int, timeout: float = 300, ids: list[str] | None = None) -> int:
    """Submit n no-op jobs, wait until all are admitted and mirrored; returns the mark
    (Redis ms) that every one of their created_at is at or after."""
    mirror = Mirror(t)
    mark = redis_ms(t)
    time.sleep(0.002)
    rest_batches(t, n, ids=ids)
    # admitted = queued, or already dispatched: a scheduler that still counts the last
    # run's stopped worker as capacity (until its next refresh) hands it a few at once;
    # they wait in the dispatch stream for the next worker
    wait_until(lambda: mirror.count(mark, ("queued", "dispatched")) >= n, timeout,
               f"{n} jobs admitted and mirrored", every=0.1)
    mirror.close()
    return mark


def run_once(t: Tidal, n: int, concurrency: int, processes: int = 1,
             timeout: float = 600) -> dict[str, Any]:
    """One drain; stops after `timeout` s of draining with the rate of what was done."""
    mirror = Mirror(t)
    ids: list[str] = []
    mark = queue_jobs(t, n, ids=ids)
    procs = [t.start_worker(concurrency, wait=False) for _ in range(processes)]
    for p in procs:
        t.wait_worker(p)
    before = t.valkey.snapshot(t.pids())
    deadline = time.monotonic() + timeout
    # every job has its row (queue_jobs waited for it): done when none is unfinished
    while mirror.unfinished(mark) and time.monotonic() <= deadline:
        time.sleep(POLL_S)
    done_wall_ms = int(time.time() * 1000)
    after = t.valkey.snapshot(t.pids())
    t.stop_workers()
    done = mirror.count(mark, TERMINAL)
    first_start, last_finish = mirror.window(mark)
    failed = done - mirror.count(mark, ("completed",))
    mirror.close()
    out: dict[str, Any] = {
        "jobs": n, "done": done, "partial": done < n,
        "concurrency": concurrency, "processes": processes,
        "jobs_per_s": round(done / max(1e-3, (done_wall_ms - first_start) / 1000), 1),
        "redis_jobs_per_s": round(done / max(1e-3, (last_finish - first_start) / 1000), 1),
        "mirror_lag_ms": done_wall_ms - last_finish,
        "not_completed": failed,
    }
    out.update(per_job(before, after, done))
    out.update(dispatch_cadence(t, ids))
    if done < n:  # stopped by the time bound: drop what is left before the next run
        t.reset()
    return out


def dispatch_cadence(t: Tidal, ids: list[str]) -> dict[str, Any]:
    """How the scheduler handed the jobs out: jobs dispatched in the same millisecond came
    from one dispatch call, so the gaps between those instants are the scheduler's refill
    period and the group sizes its batch (with free-slot dispatch, at most the slots)."""
    stamps = sorted(int(x) for x in _states(t, ids, "dispatched_at") if x)
    if len(stamps) < 2:
        return {}
    groups: dict[int, int] = {}
    for ms in stamps:
        groups[ms] = groups.get(ms, 0) + 1
    instants = sorted(groups)
    gaps = [b - a for a, b in zip(instants, instants[1:], strict=False)]
    return {"dispatch_calls": len(instants),
            "dispatch_batch_mean": round(len(stamps) / len(instants), 1),
            "dispatch_gap_ms_p50": statistics.median(gaps) if gaps else None}


# -- diagnostic: the same drain with the scheduler's recorder off ------------------------------


def _states(t: Tidal, ids: list[str], field: str) -> list[Any]:
    pipe = t.r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(t.keys.job(job_id), field)
    return list(pipe.execute())


def run_without_recorder(t: Tidal, n: int, concurrency: int,
                         timeout: float = 600) -> dict[str, Any]:
    """Done = every job hash terminal in Redis (checked in submission order, 200 at a
    time, so the check costs little). Needs a scheduler started with TIDAL_RECORDER=false:
    what the path costs without the SQL mirror."""
    ids: list[str] = []
    rest_batches(t, n, ids=ids)
    queue = t.keys.queue("default")
    wait_until(lambda: t.r.zcard(queue) >= n, 300, f"{n} jobs admitted", every=0.05)
    proc = t.start_worker(concurrency, wait=True)
    before = t.valkey.snapshot(t.pids())
    deadline = time.monotonic() + timeout
    at = 0
    while at < n and time.monotonic() < deadline:
        window = ids[at:at + 200]
        states = _states(t, window, "state")
        while states and states[0] in TERMINAL:
            states.pop(0)
            at += 1
        if at < n and len(states) == len(window):
            time.sleep(POLL_S)
    done_wall_ms = int(time.time() * 1000)
    after = t.valkey.snapshot(t.pids())
    t.stop_workers()
    del proc
    starts = [int(x) for x in _states(t, ids, "started_at") if x]
    ends = [int(x) for x in _states(t, ids[:at], "finished_at") if x]
    out: dict[str, Any] = {
        "jobs": n, "done": at, "partial": at < n, "concurrency": concurrency, "processes": 1,
        "jobs_per_s": round(at / max(1e-3, (done_wall_ms - min(starts)) / 1000), 1),
        "redis_jobs_per_s": round(at / max(1e-3, (max(ends) - min(starts)) / 1000), 1),
    }
    out.update(per_job(before, after, max(at, 1)))
    out.update(dispatch_cadence(t, ids[:at]))
    if at < n:  # stopped by the time bound: drop what is left before the next run
        t.reset()
    return out
