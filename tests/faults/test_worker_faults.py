"""Workers dying, freezing and stopping under running jobs (RELIABILITY.md F1, F2, F3)."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.faults import ledger
from tests.faults.conftest import FAST, Cluster, figures, monotonic, terminal_events
from tests.support import wait_for
from worker.cgroup import pids_mount

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def worker_named(c: Cluster, worker_id: str, *names: str) -> str:
    return next(n for n in names if f"-{c.pid(n)}-" in worker_id)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("timing", ["fast", "defaults"])
@pytest.mark.timeout(90)
def test_f1_worker_killed_mid_job_completes_elsewhere(tmp_path: Path, timing: str) -> None:
    """kill -9 the worker running a job: it completes on the other worker within 30 s
    (with the default heartbeat, TTL and reap interval too); the orphaned process of the
    lost attempt is killed by the surviving worker, so the two never overlap."""
    c = Cluster(tmp_path, FAST if timing == "fast" else {})
    try:
        c.api()
        c.scheduler()
        c.worker("w1", "-c", "2")
        c.worker("w2", "-c", "2")
        c.wait_workers("w1", "w2")
        book = tmp_path / "ledger"
        [job] = c.submit([{"command": ledger.shell_job(book, 4, later=0.1)}])
        try:
            first = wait_for(lambda: ledger.started(book, job, 1), timeout=30, what="attempt 1")
        except AssertionError as exc:  # say where the job is, not only that it did not start
            raise AssertionError(f"{exc}; job: {c.redis.hgetall(c.keys.job(job))}") from exc
        victim = worker_named(c, c.redis.hget(c.keys.job(job), "worker") or "", "w1", "w2")
        survivor = "w2" if victim == "w1" else "w1"
        killed_at = monotonic()
        c.kill(victim)
        wait_for(lambda: ledger.started(book, job, 2), timeout=30, what="attempt 2")
        recovery = monotonic() - killed_at
        c.wait_terminal([job], timeout=30)
        h = c.redis.hgetall(c.keys.job(job))
        assert (h["state"], h["attempt"], h["lost"]) == ("completed", "2", "1")
        assert h["worker"] == c.worker_id(survivor)
        assert terminal_events(c.events()) == {job: 1}
        if pids_mount() is not None:  # the orphan was swept before attempt 2 began
            assert gone(first.pid) and ledger.ended(book, job, 1) is None
        assert recovery < 30
        figures(f"F1 worker kill -9 ({timing})", submitted=1, accepted=1, lost=0,
                duplicated=0, faults=1, recovery_s=recovery)
    finally:
        c.close()


@pytest.mark.timeout(90)
def test_f2_frozen_worker_does_not_overwrite_the_new_attempt(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    """SIGSTOP the worker past its TTL, then SIGCONT: the job was given to another worker;
    the thawed one kills its stale process and writes nothing for the job."""
    c = cluster
    c.api()
    c.scheduler()
    c.worker("w1", "-c", "2")
    c.worker("w2", "-c", "2")
    c.wait_workers("w1", "w2")
    book = tmp_path / "ledger"
    [job] = c.submit([{"command": ledger.shell_job(book, 6, later=2)}])
    stale = wait_for(lambda: ledger.started(book, job, 1), timeout=30, what="attempt 1")
    frozen = worker_named(c, c.redis.hget(c.keys.job(job), "worker") or "", "w1", "w2")
    other = "w2" if frozen == "w1" else "w1"
    stopped_at = monotonic()
    c.signal(frozen, signal.SIGSTOP)
    try:
        wait_for(lambda: ledger.started(book, job, 2), timeout=30, what="attempt 2")
        recovery = monotonic() - stopped_at
    finally:
        c.signal(frozen, signal.SIGCONT)
    thawed_at = monotonic()
    wait_for(lambda: gone(stale.pid), timeout=10, what="the stale process to be killed")
    noticed = monotonic() - thawed_at
    c.wait_terminal([job], timeout=30)
    h = c.redis.hgetall(c.keys.job(job))
    assert (h["state"], h["attempt"], h["worker"]) == ("completed", "2", c.worker_id(other))
    events = [e for e in c.events() if e["job"] == job]
    assert terminal_events(events) == {job: 1}
    assert events[-1]["by"] == c.worker_id(other)  # the new attempt's result, not the stale
    assert ledger.ended(book, job, 1) is None  # killed before it could end
    assert c.procs[frozen].poll() is None  # the thawed worker lives on and serves
    [after] = c.submit([{"command": ["true"]}])
    assert c.wait_terminal([after], timeout=30)[after] == "completed"
    figures("F2 worker SIGSTOP past TTL", submitted=2, accepted=2, lost=0, duplicated=0,
            faults=1, recovery_s=recovery, stale_killed_s=noticed)


@pytest.mark.timeout(90)
def test_f3_sigterm_finishes_short_jobs_and_hands_back_long_ones(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    """SIGTERM with four running jobs: the two that end within the grace period complete
    there; the two that do not are handed back at once (long before the 30 s TTL this
    worker runs with) and complete on another worker; the worker exits 0."""
    c = cluster
    c.api()
    c.scheduler()
    c.worker("w1", "-c", "4", TIDAL_SHUTDOWN_GRACE_S="2", TIDAL_WORKER_TTL_S="30")
    c.wait_workers("w1")
    flag = tmp_path / "go"
    short = {"command": f"while [ ! -f {flag} ]; do sleep 0.05; done; echo short"}
    long = {"command": '[ "$TIDAL_ATTEMPT" -ge 2 ] && exit 0; exec sleep 60'}
    jobs = c.submit([short, short, long, long])
    wait_for(lambda: all(s == "running" for s in c.states(jobs).values()), timeout=30,
             what="four jobs running on w1")
    c.worker("w2", "-c", "4")
    c.wait_workers("w2")
    w1 = c.worker_id("w1")
    termed_at = monotonic()
    c.signal("w1", signal.SIGTERM)
    flag.touch()  # the short jobs end now, well within the grace period
    assert c.procs["w1"].wait(timeout=15) == 0
    exit_s = monotonic() - termed_at
    handed_back = wait_for(lambda: [e for e in c.events() if e["job"] in jobs[2:]
                                    and e.get("reason") == "handed_back"], timeout=10)
    c.wait_terminal(jobs, timeout=30)
    hashes = [c.redis.hgetall(c.keys.job(j)) for j in jobs]
    assert [(h["state"], h["attempt"], h["worker"]) for h in hashes[:2]] == [
        ("completed", "1", w1)] * 2
    w2 = c.worker_id("w2")
    assert [(h["state"], h["attempt"], h["worker"]) for h in hashes[2:]] == [
        ("completed", "2", w2)] * 2
    assert {e["lost_worker"] for e in handed_back} == {w1}
    assert terminal_events(c.events()) == dict.fromkeys(jobs, 1)
    assert exit_s < 2 + 5  # the grace period plus killing and handing back
    assert not c.redis.exists(c.keys.worker(w1))  # it left: no lease to wait out
    figures("F3 worker SIGTERM", submitted=4, accepted=4, lost=0, duplicated=0, faults=1,
            recovery_s=exit_s, handed_back=len(handed_back))
