"""cli/up.py Supervisor with real, harmless child processes: restarts with backoff, reports,
and a stop that ends every child by PID within its deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cli.up import ChildSpec, Supervisor, UpOptions, api_url, service_specs
from tests.support import wait_for

EXIT_3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
# ignores SIGTERM, so only the SIGKILL after the grace period ends it
STUBBORN = [sys.executable, "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"]


@pytest.fixture
def messages() -> list[str]:
    return []


@pytest.fixture
def sup(messages: list[str]) -> Iterator[Supervisor]:
    supervisor = Supervisor(report=messages.append, min_backoff=0.05, max_backoff=0.2,
                            reset_after=60.0)
    try:
        yield supervisor
    finally:
        supervisor.stop(grace=5.0)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_dying_child_is_restarted_with_backoff_and_reported(
    sup: Supervisor, messages: list[str]
) -> None:
    dying = sup.add(ChildSpec("worker-1", EXIT_3))
    steady = sup.add(ChildSpec("api", SLEEP))
    steady_pid = steady.proc.pid  # type: ignore[union-attr]

    def restarted_three_times() -> bool:
        sup.poll()
        return dying.restarts >= 3

    wait_for(restarted_three_times, timeout=15, what="three restarts")
    exits = [m for m in messages if m.startswith("worker-1 exited with code 3; restarting in")]
    assert exits[:3] == [
        "worker-1 exited with code 3; restarting in 0.05s",
        "worker-1 exited with code 3; restarting in 0.1s",
        "worker-1 exited with code 3; restarting in 0.2s",
    ]
    assert steady.restarts == 0 and steady.proc is not None and steady.proc.pid == steady_pid


def test_backoff_resets_after_a_long_enough_run(messages: list[str]) -> None:
    now = [0.0]
    sup = Supervisor(report=messages.append, min_backoff=1, max_backoff=30, reset_after=60,
                     clock=lambda: now[0])
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(spec: ChildSpec) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(EXIT_3))
        procs[-1].wait()
        return procs[-1]

    child = sup.add(ChildSpec("scheduler", []), spawn)

    def run_then_exit(seconds_up: float) -> str:
        now[0] += seconds_up
        sup.poll()  # notices the exit, schedules the restart
        delay = messages[-1].split("restarting in ")[1]
        now[0] += float(delay.removesuffix("s")) - 0.25
        sup.poll()
        assert child.proc is None  # not before its backoff is over
        now[0] += 0.25
        sup.poll()  # restarted
        assert child.proc is not None
        return delay

    assert [run_then_exit(0.5) for _ in range(7)] == ["1s", "2s", "4s", "8s", "16s", "30s", "30s"]
    # a child that ran for 60 s or more starts again at the minimum backoff
    assert run_then_exit(60.0) == "1s"
    assert run_then_exit(0.5) == "2s"
    assert messages[-1] == "scheduler exited with code 3; restarting in 2s"
    assert child.restarts == 9 and len(procs) == 10
    sup.stop(grace=1)


def test_a_child_that_cannot_start_is_retried(sup: Supervisor, messages: list[str]) -> None:
    child = sup.add(ChildSpec("api", ["/nonexistent/tidal-binary"]))
    assert child.proc is None and child.restart_at is not None
    assert messages[0].startswith("api failed to start (")
    assert messages[0].endswith("restarting in 0.05s")


def test_stop_terminates_every_child_by_pid(sup: Supervisor, tmp_path: Path) -> None:
    children = [sup.add(ChildSpec(f"worker-{i}", SLEEP)) for i in range(3)]
    redis = sup.add(ChildSpec("redis", SLEEP, last=True))
    pids = sup.pids()
    assert len(pids) == 4 and all(alive(p) for p in pids)
    started = time.monotonic()
    sup.stop(grace=10.0)
    assert time.monotonic() - started < 5.0  # SIGTERM was enough; no waiting out the grace
    assert not any(alive(p) for p in pids)
    assert all(c.proc is None for c in [*children, redis])


def test_stop_kills_stragglers_after_the_grace(sup: Supervisor, messages: list[str],
                                              tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    child = sup.add(ChildSpec("worker-1", STUBBORN, log=log))
    pid = child.proc.pid  # type: ignore[union-attr]
    wait_for(lambda: log.exists() and "ready" in log.read_text(), what="handler installed")
    started = time.monotonic()
    sup.stop(grace=0.5)
    assert 0.5 <= time.monotonic() - started < 5.0
    assert not alive(pid)
    assert "worker-1 did not stop in 0.5s; killing it" in messages


def test_redis_is_stopped_last(sup: Supervisor, messages: list[str]) -> None:
    sup.add(ChildSpec("redis", SLEEP, last=True))
    sup.add(ChildSpec("api", SLEEP))
    sup.stop(grace=5.0)
    stops = [m.split()[1] for m in messages if m.startswith("stopping")]
    assert stops == ["api", "redis"]


def test_no_restart_after_stop(sup: Supervisor) -> None:
    child = sup.add(ChildSpec("worker-1", EXIT_3))
    assert child.proc is not None
    child.proc.wait()  # it died, and stop() comes before the supervisor noticed
    sup.stop(grace=1.0)
    for _ in range(3):
        sup.poll()
    assert child.proc is None and child.restart_at is None and child.restarts == 0


def test_service_specs_and_url() -> None:
    env = {"TIDAL_REDIS_URL": "redis://x"}
    specs = service_specs(UpOptions(workers=2, concurrency=3, allow_modules=["tasks"]), env,
                          Path("/logs"))
    assert [s.name for s in specs] == ["api", "scheduler", "worker-1", "worker-2"]
    assert specs[0].argv[1:] == ["-m", "cli", "api", "--host", "127.0.0.1", "--port", "8000"]
    assert specs[2].argv[3:] == ["worker", "--concurrency", "3", "--allow-module", "tasks"]
    assert all(s.env is env and s.log == Path("/logs") / f"{s.name}.log" for s in specs)
    assert [s.name for s in service_specs(UpOptions(workers=0), env, Path("/l"))] == [
        "api", "scheduler"]
    assert api_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert api_url("::", 9) == "http://[::1]:9"


def test_children_run_in_their_own_session(sup: Supervisor) -> None:
    child = sup.add(ChildSpec("api", SLEEP))
    assert child.proc is not None
    assert os.getsid(child.proc.pid) == child.proc.pid != os.getsid(0)
