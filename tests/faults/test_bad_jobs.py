"""Poison and bad jobs on real workers (RELIABILITY.md F14, F15): each ends `failed` with
a clear reason (or, for output floods, completes with its output cut) and the worker
keeps serving; a job that kills its worker fails as `poison` after `max_deliveries`."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.conftest import Cluster, figures, monotonic
from tests.support import wait_for
from worker.cgroup import JobCgroup, own_pids_cgroup, pids_mount

pytestmark = [pytest.mark.slow, pytest.mark.fault]

JOBS = "tests.faults.jobs"


def py(function: str, *args: object, **spec: object) -> dict[str, object]:
    return {"kind": "python", "function": f"{JOBS}:{function}", "args": list(args), **spec}


@pytest.mark.timeout(90)
def test_f14_a_job_that_kills_its_worker_fails_as_poison(cluster: Cluster) -> None:
    """Thread mode: os._exit in the job takes the worker down each time. A supervisor
    restarts it (as `tidal up` does); the reaper requeues the job until it was lost more
    than max_deliveries (3) times, then fails it as poison, and nothing loops after."""
    c = cluster
    c.api()
    c.scheduler()
    c.worker("w1", "-c", "1")
    c.wait_workers("w1")
    [job] = c.submit([py("crash")])
    restarts = 0
    started = monotonic()

    def supervise() -> bool:
        nonlocal restarts
        if c.procs["w1"].poll() is not None:
            restarts += 1
            c.worker("w1", "-c", "1")
        return c.states([job])[job] == "failed"

    wait_for(supervise, timeout=60, interval=0.1, what="the job to fail as poison")
    took = monotonic() - started
    h = c.redis.hgetall(c.keys.job(job))
    assert (h["reason"], h["lost"], h["attempt"]) == ("poison", "4", "4")
    [after] = c.submit([{"command": ["echo", "next"]}])
    assert c.wait_terminal([after], timeout=30)[after] == "completed"
    assert c.procs["w1"].poll() is None and restarts == 4  # no fifth delivery
    figures("F14 worker-killing python job", submitted=2, accepted=2, lost=0, duplicated=0,
            faults=restarts, recovery_s=took, deliveries=h["attempt"])


@pytest.mark.timeout(90)
def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(cluster: Cluster) -> None:
    """One worker with python jobs isolated in child processes, and every kind of bad job
    at once; the worker process never changes."""
    c = cluster
    c.api()
    c.scheduler()
    c.worker("w1", "-c", "4", TIDAL_PYTHON_ISOLATION="process", TIDAL_LOG_MAX_BYTES="1048576")
    c.wait_workers("w1")
    pid = c.pid("w1")
    cases = {
        "raise": (py("boom", "bad"), ("failed", "exception", "ValueError: bad")),
        "os._exit": (py("crash", 3), ("failed", "crashed",
                                      "the python process exited with 3 before the function "
                                      "returned")),
        "segfault": (py("segfault"), ("failed", "crashed", "the python process was killed by "
                                      "SIGSEGV before the function returned")),
        "hang": (py("stubborn", timeout=1), ("failed", "timeout", "timed out after 1s")),
        "missing command": ({"command": ["tidal-no-such-command"]}, ("failed", "exec_error",
                                                                     None)),
        "flood": ({"command": "yes | head -c 50M"}, ("completed", None, None)),
        "binary": ({"command": "head -c 5M /dev/urandom"}, ("completed", None, None)),
    }
    names = list(cases)
    ids = dict(zip(names, c.submit([cases[n][0] for n in names]), strict=True))
    started = monotonic()
    c.wait_terminal(list(ids.values()), timeout=60)
    took = monotonic() - started
    for name, job in ids.items():
        h = c.redis.hgetall(c.keys.job(job))
        state, reason, error = cases[name][1]
        assert h["state"] == state, (name, h)
        assert (h.get("reason") or None) == reason, (name, h)
        if error:
            assert h["error"] == error, (name, h)
    assert "No such file" in c.redis.hget(c.keys.job(ids["missing command"]), "error")
    flood_log = [f["l"] for _, f in c.redis.xrange(c.keys.log(ids["flood"]))]
    assert any("not stored; the last lines follow" in line for line in flood_log)
    assert len(flood_log) < 600_000
    [after] = c.submit([{"command": ["true"]}])
    assert c.wait_terminal([after], timeout=30)[after] == "completed"
    assert c.procs["w1"].poll() is None and c.pid("w1") == pid
    figures("F14 bad jobs", submitted=len(ids) + 1, accepted=len(ids) + 1, lost=0,
            duplicated=0, faults=len(ids), recovery_s=took, worker_restarts=0)


@contextmanager
def outer_cgroup(max_pids: int) -> Iterator[JobCgroup]:
    """A pids cgroup the worker is born in: even a job that escaped its own cgroup stays
    bounded by this one."""
    mount = pids_mount()
    home = mount / own_pids_cgroup().lstrip("/") if mount else None
    if home is None or not home.is_dir() or not (home / "tasks").exists():
        pytest.skip("fork bombs are only bounded with a cgroup v1 pids hierarchy (none here)")
    path = home / f"tidal-fault-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
    except OSError as exc:
        pytest.skip(f"fork bombs are only bounded with a writable pids cgroup: {exc}")
    cg = JobCgroup(path, home, max_pids)
    try:
        yield cg
    finally:
        for child in sorted(path.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                JobCgroup(child, home).remove()
        cg.remove()


@pytest.mark.timeout(90)
def test_f15_fork_bomb_is_bounded(cluster: Cluster, tmp_path: Path) -> None:
    """`:(){ :|:& };:` in a job with a 64-process pids cgroup: it fails with reason
    pids_limit, nothing of it survives, the worker keeps its heartbeat and serves on."""
    c = cluster
    c.api()
    c.scheduler()
    with outer_cgroup(400) as outer:
        with outer.entered():  # born inside: its jobs' cgroups nest under this one
            worker = c.worker("w1", "-c", "2", TIDAL_JOB_PIDS_MAX="64",
                              TIDAL_JOB_CGROUP_ROOT=str(outer.path / "jobs"))
        assert isinstance(worker, subprocess.Popen)
        wid = c.worker_id("w1")
        [bomb] = c.submit([{"command": ["bash", "-c", ":(){ :|:& };:"], "timeout": 10}])
        started = monotonic()
        beats = []

        def watch() -> bool:
            beats.append(c.redis.pttl(c.keys.worker(wid)))
            return c.states([bomb])[bomb] == "failed"

        wait_for(watch, timeout=60, interval=0.1, what="the fork bomb to fail")
        took = monotonic() - started
        h = c.redis.hgetall(c.keys.job(bomb))
        assert h["reason"] == "pids_limit" and "more than 64 processes" in h["error"]
        assert min(beats) > 0  # the heartbeat never lapsed
        jobs_dir = outer.path / "jobs" / wid
        wait_for(lambda: not [p for p in jobs_dir.iterdir() if p.is_dir()], timeout=10,
                 what="the job's cgroup removed")
        [after] = c.submit([{"command": ["true"]}])
        assert c.wait_terminal([after], timeout=30)[after] == "completed"
        c.close()  # stop the worker while the cgroup still exists
    figures("F15 fork bomb", submitted=2, accepted=2, lost=0, duplicated=0, faults=1,
            recovery_s=took, pids_max=64)
