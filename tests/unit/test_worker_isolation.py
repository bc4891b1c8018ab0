"""Bad jobs against the runners on real processes: output floods, fork bombs (in a pids
cgroup), python jobs in a child interpreter that crash, raise, hang or print."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.clock import monotonic
from common.keys import Keys
from tests.support import wait_for
from tests.unit.test_worker_output import FakeClient
from tests.unit.test_worker_runners import job_processes, lines, make_run
from worker.cgroup import Cgroups, JobCgroup, own_pids_cgroup, pids_mount
from worker.job import CANCELLED
from worker.output import LogWriter, Overflow
from worker.python import run_python_isolated
from worker.shell import Limits, run_shell

ALLOWED = ("common.tasks", "tests.faults.jobs")


def budget_writer(max_lines: int = 1000, max_bytes: int | None = None) -> tuple[
    FakeClient, LogWriter
]:
    client = FakeClient()
    return client, LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=max_lines,
                             max_bytes=max_bytes)


# -- output budget ----------------------------------------------------------------------


def test_overflow_counts_and_keeps_whole_lines_of_the_tail() -> None:
    over = Overflow(tail_bytes=10)
    over.feed(b"partial-line\n" + b"".join(b"%d\n" % i for i in range(100)))
    skipped_bytes, skipped_lines, tail = over.finish(line_max_bytes=1024)
    # the last 10 bytes are "\n97\n98\n99\n": the cut line before them is left out
    assert [text for text, _ in tail] == ["97", "98", "99"]
    assert skipped_lines == 101 - 3
    assert skipped_bytes == over.total - len(b"97\n98\n99\n")


def test_writer_budget_then_one_note() -> None:
    client, writer = budget_writer(max_lines=1000, max_bytes=10)
    for i in range(5):
        writer.add("o", f"line {i}")  # the second one crosses 10 characters
    writer.close()
    assert lines(client) == [
        "line 0", "line 1",
        "[output over this attempt's limit (1000 lines / 10 bytes): 3 lines dropped (21 bytes), "
        "not stored]",
    ]


def test_output_flood_is_counted_not_stored() -> None:
    """`yes` for 50 MB: the first lines, one note, the tail; quickly, and the job ends."""
    client, writer = budget_writer(max_lines=1000, max_bytes=1 << 20)
    started = monotonic()
    outcome = run_shell(make_run(command="yes | head -c 50M; echo done >&2"), writer,
                        timeout_s=60, kill_grace_s=0.5, line_max_bytes=1024)
    writer.close()
    assert (outcome.state, outcome.exit_code) == ("completed", 0)
    assert monotonic() - started < 10
    out = lines(client)
    assert out[:1000] == ["y"] * 1000
    assert out[1000].startswith("[output over this attempt's limit (1000 lines")
    assert "not stored; the last lines follow]" in out[1000]
    assert out[-1] == "done" and lines(client, "e") == ["done"]
    assert 1000 < len(out) <= 1000 + 1 + 1000 + 1  # head, note, tail lines, stderr


def test_binary_flood_never_breaks_the_reader() -> None:
    client, writer = budget_writer(max_lines=1000, max_bytes=256 * 1024)
    outcome = run_shell(make_run(command="head -c 10M /dev/urandom"), writer, timeout_s=60,
                        kill_grace_s=0.5, line_max_bytes=1024)
    writer.close()
    assert outcome.state == "completed"
    out = lines(client, "o")
    assert "\ufffd" in "".join(out[:50])
    assert any("not stored" in line for line in lines(client, "x"))


def test_missing_command_fails_with_exec_error() -> None:
    client, writer = budget_writer()
    outcome = run_shell(make_run(command=["tidal-no-such-command-xyz"]), writer, timeout_s=5,
                        kill_grace_s=0.5, line_max_bytes=1024)
    assert (outcome.state, outcome.reason, outcome.exit_code) == ("failed", "exec_error", None)
    assert "No such file or directory" in outcome.error


# -- pids cgroup --------------------------------------------------------------------------


def cgroups_possible() -> str | None:
    """Why a pids cgroup cannot be used here (None when it can)."""
    mount = pids_mount()
    if mount is None:
        return "no cgroup v1 pids hierarchy is mounted (cgroup v2 only?)"
    if not os.access(mount / own_pids_cgroup().lstrip("/"), os.W_OK):
        return "the pids cgroup hierarchy is not writable (not root?)"
    return None


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    """Job cgroups under an outer test cgroup (pids.max 200), so even a job that escaped
    its own cgroup stays bounded."""
    why = cgroups_possible()
    if why:
        pytest.skip(f"fork bombs are only bounded with a pids cgroup: {why}")
    mount = pids_mount()
    assert mount is not None
    outer = mount / own_pids_cgroup().lstrip("/") / f"tidal-test-{uuid.uuid4().hex[:8]}"
    outer.mkdir()
    (outer / "pids.max").write_text("200")
    found = Cgroups.create(f"unit-{os.getpid()}-ab12", 32, root=outer)
    assert found is not None
    try:
        yield found
    finally:
        found.close()
        JobCgroup(outer, outer).remove()


def test_a_job_is_spawned_inside_its_cgroup_and_nothing_outlives_it(
    cgroups: Cgroups,
) -> None:
    cg = cgroups.job("j1-1")
    assert cg is not None
    client, writer = budget_writer()
    marker = "sleep 79"
    outcome = run_shell(make_run(command=f"{marker} & grep pids /proc/self/cgroup"), writer,
                        timeout_s=10, kill_grace_s=0.5, line_max_bytes=1024, cgroup=cg)
    writer.close()
    assert outcome.state == "completed"
    mount = pids_mount()
    assert mount is not None
    [line] = lines(client, "o")
    assert line.endswith(":/" + str(cg.path.relative_to(mount)))  # spawned inside it
    assert cg.pids() == [] and job_processes(marker) == []
    cg.remove()
    assert not cg.path.exists()


@pytest.mark.timeout(60)
def test_fork_bomb_is_bounded_and_fails_with_pids_limit(cgroups: Cgroups) -> None:
    # first prove the limit holds with a bounded "bomb" (at most 60 sleeps, harmless)
    cg = cgroups.job("probe-1")
    assert cg is not None
    _, writer = budget_writer()
    probe = run_shell(make_run(command="for i in $(seq 60); do sleep 30 & done; wait"), writer,
                      timeout_s=2, kill_grace_s=0.2, line_max_bytes=1024, cgroup=cg)
    cg.remove()
    assert probe.reason == "pids_limit", probe
    # now the real thing
    cg = cgroups.job("bomb-1")
    assert cg is not None
    client, writer = budget_writer()
    started = monotonic()
    outcome = run_shell(make_run(command=["bash", "-c", ":(){ :|:& };:"]), writer, timeout_s=5,
                        kill_grace_s=0.2, line_max_bytes=1024, cgroup=cg)
    writer.close()
    assert (outcome.state, outcome.reason) == ("failed", "pids_limit")
    assert "more than 32 processes" in outcome.error
    assert cg.pids() == []
    assert monotonic() - started < 20
    assert outcome.error in lines(client, "x")
    cg.remove()


def test_sweep_kills_what_a_dead_worker_left(cgroups: Cgroups, tmp_path: Path) -> None:
    # pid 4194303 is past the kernel's pid_max: that worker is surely not alive
    dead = cgroups.base.parent / f"{socket.gethostname()}-4194303-dead"
    leftover = JobCgroup(dead / "j-1", cgroups.home)
    leftover.path.mkdir(parents=True)
    client, writer = budget_writer()
    run = make_run(command=["sleep", "78"])
    thread = threading.Thread(target=run_shell, args=(run, writer), kwargs={
        "timeout_s": 30, "kill_grace_s": 0.2, "line_max_bytes": 1024, "cgroup": leftover})
    thread.start()
    try:
        wait_for(lambda: leftover.pids(), what="the leftover job")
        cgroups.sweep()
        thread.join(10)
        assert not thread.is_alive()
        assert not dead.exists()
    finally:
        run.abort(CANCELLED)
        thread.join(10)


# -- python jobs in a child interpreter -------------------------------------------------


def isolated(function: str, timeout_s: float = 20.0, run_hook: Any = None, **spec: Any
             ) -> tuple[Any, FakeClient]:
    client, writer = budget_writer()
    run = make_run(kind="python", function=function, **spec)
    if run_hook:
        run_hook(run)
    limits = Limits(timeout_s, 0.5, 1024)
    outcome = run_python_isolated(run, writer, allowed=ALLOWED, limits=limits)
    writer.close()
    return outcome, client


def test_isolated_result_and_captured_print() -> None:
    outcome, client = isolated("tests.faults.jobs:chatty", kwargs={"n": 2})
    assert (outcome.state, outcome.result) == ("completed", "2")
    assert lines(client, "o") == ["out 0", "out 1"]
    assert lines(client, "e") == ["err"]


def test_isolated_exception() -> None:
    outcome, client = isolated("tests.faults.jobs:boom", args=["bad"])
    assert (outcome.state, outcome.reason, outcome.error) == ("failed", "exception",
                                                              "ValueError: bad")
    assert lines(client, "e")[-1] == "ValueError: bad"


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("tests.faults.jobs:crash", "the python process exited with 1 before the function "
                                    "returned"),
        ("tests.faults.jobs:segfault", "the python process was killed by SIGSEGV before the "
                                       "function returned"),
    ],
)
def test_isolated_crash_fails_only_the_job(function: str, error: str) -> None:
    outcome, _ = isolated(function)
    assert (outcome.state, outcome.reason, outcome.error) == ("failed", "crashed", error)


def test_isolated_timeout_is_enforced() -> None:
    started = monotonic()
    outcome, _ = isolated("tests.faults.jobs:stubborn", timeout_s=1.0)
    assert (outcome.state, outcome.reason) == ("failed", "timeout")
    assert monotonic() - started < 5


def test_isolated_not_allowed_never_starts() -> None:
    outcome, client = isolated("os:getcwd")
    assert (outcome.state, outcome.reason) == ("failed", "not_allowed")
    assert lines(client, "x") == [outcome.error]


def test_isolated_cooperative_cancel() -> None:
    client, writer = budget_writer()
    run = make_run(kind="python", function="tests.faults.jobs:cooperative")
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(run_python_isolated(
        run, writer, allowed=ALLOWED, limits=Limits(30, 5.0, 1024))))
    thread.start()
    wait_for(lambda: writer.flush() and lines(client, "o") == ["waiting"], timeout=20,
             what="the job to start")
    run.abort(CANCELLED)
    thread.join(10)
    assert result and (result[0].state, result[0].reason) == ("cancelled", "cancelled")
