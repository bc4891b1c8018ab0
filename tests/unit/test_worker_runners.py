"""The shell and python runners on real processes, with the log captured in memory."""

from __future__ import annotations

import signal
import threading
from typing import Any

import psutil
import pytest

from common.clock import monotonic
from common.keys import Keys
from common.models import JobSubmission
from tests.support import wait_for
from tests.unit.test_worker_output import FakeClient
from worker.job import CANCELLED, JobRun
from worker.output import LogWriter
from worker.python import JobContext, run_python
from worker.shell import run_shell

ALLOWED = ("common.tasks", "tests.unit.test_worker_runners")


def make_run(**spec: Any) -> JobRun:
    return JobRun("j1", "default", "1-0", 1, JobSubmission.model_validate(spec))


def make_writer() -> tuple[FakeClient, LogWriter]:
    client = FakeClient()
    return client, LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=1000)


def lines(client: FakeClient, stream: str | None = None) -> list[str]:
    return [
        args[1]["l"]
        for batch in client.batches
        for op, args in batch
        if op == "xadd" and (stream is None or args[1]["s"] == stream)
    ]


def shell(run: JobRun, timeout_s: float = 10.0) -> tuple[Any, FakeClient]:
    client, writer = make_writer()
    outcome = run_shell(run, writer, timeout_s=timeout_s, kill_grace_s=0.5, line_max_bytes=1024)
    writer.close()
    return outcome, client


def job_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


# -- shell ------------------------------------------------------------------------------


def test_exit_zero_with_stdout_and_stderr_apart() -> None:
    outcome, client = shell(make_run(command="echo out; echo err >&2; printf tail"))
    assert (outcome.state, outcome.exit_code) == ("completed", 0)
    assert lines(client, "o") == ["out", "tail"]
    assert lines(client, "e") == ["err"]


def test_env_and_cwd(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDAL_TOKEN", "secret")  # the worker's credentials stay with it
    run = make_run(command='echo "$TIDAL_JOB_ID $TIDAL_ATTEMPT $FOO [$TIDAL_TOKEN]"; pwd',
                   env={"FOO": "bar"}, cwd=str(tmp_path))
    outcome, client = shell(run)
    assert outcome.state == "completed"
    assert lines(client, "o") == ["j1 1 bar []", str(tmp_path)]


def test_nonzero_exit() -> None:
    outcome, _ = shell(make_run(command="exit 3"))
    assert (outcome.state, outcome.exit_code, outcome.reason) == ("failed", 3, "exit_code")
    assert outcome.error == "exited with 3"


def test_killed_by_a_signal() -> None:
    outcome, _ = shell(make_run(command="kill -9 $$"))
    assert (outcome.state, outcome.exit_code, outcome.reason) == ("failed", 137, "signal")
    assert outcome.error == "killed by SIGKILL"


@pytest.mark.parametrize(
    "spec",
    [
        {"command": ["/nonexistent/tidal-cmd"]},
        {"command": ["true"], "cwd": "/nonexistent/dir"},
        {"command": ["/etc/hostname"]},  # not executable
        {"command": ["true", "x" * 200_000]},  # E2BIG (past the model's caps: not validated)
    ],
)
def test_exec_errors(spec: dict[str, Any]) -> None:
    sub = JobSubmission.model_construct(**{"kind": "shell", "env": {}, "cwd": None, **spec})
    outcome, client = shell(JobRun("j1", "default", "1-0", 1, sub))
    assert (outcome.state, outcome.exit_code, outcome.reason) == ("failed", None, "exec_error")
    assert lines(client, "x") == [outcome.error]


def test_timeout_kills_the_whole_tree() -> None:
    marker = "sleep 97"
    started = monotonic()
    outcome, client = shell(make_run(command=f"{marker} & {marker}; wait"), timeout_s=0.5)
    assert (outcome.state, outcome.exit_code, outcome.reason) == ("failed", None, "timeout")
    assert outcome.error == "timed out after 0.5s"
    assert monotonic() - started < 5
    assert job_processes(marker) == []
    assert any("timed out" in line for line in lines(client, "x"))


def test_term_ignoring_job_is_killed_after_the_grace() -> None:
    outcome, _ = shell(make_run(command="trap '' TERM; sleep 96 & sleep 96; wait"),
                       timeout_s=0.3)
    assert outcome.reason == "timeout"
    assert job_processes("sleep 96") == []


def test_grandchild_holding_the_pipe_does_not_hang_the_runner() -> None:
    started = monotonic()
    outcome, client = shell(make_run(command="sleep 95 & echo started"))
    assert outcome.state == "completed"
    assert lines(client, "o") == ["started"]
    assert monotonic() - started < 5
    assert job_processes("sleep 95") == []  # leftovers of a finished job are killed


def test_abort_stops_a_running_job() -> None:
    run = make_run(command=["sleep", "94"])
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(shell(run)))
    thread.start()
    try:
        procs = wait_for(lambda: job_processes("sleep 94"), what="sleep to start")
        run.abort(CANCELLED)
        thread.join(10)
    finally:
        for proc in alive(job_processes("sleep 94")):
            proc.send_signal(signal.SIGKILL)
    outcome, _ = result[0]
    assert (outcome.state, outcome.reason) == ("cancelled", "cancelled")
    assert alive(procs) == []


def test_long_line_is_split() -> None:
    outcome, client = shell(make_run(command="head -c 3000 /dev/zero | tr '\\0' a"))
    assert outcome.state == "completed"
    assert [len(t) for t in lines(client, "o")] == [1024, 1024, 952]


# -- python -----------------------------------------------------------------------------


def py(function: str, timeout_s: float = 10.0, **spec: Any) -> tuple[Any, FakeClient, JobRun]:
    client, writer = make_writer()
    run = make_run(kind="python", function=function, **spec)
    outcome = run_python(run, writer, allowed=ALLOWED, timeout_s=timeout_s, line_max_bytes=1024)
    writer.close()
    return outcome, client, run


def with_ctx(ctx: JobContext, n: int = 2) -> dict[str, Any]:
    for i in range(n):
        ctx.log(f"step {i}")
    return {"job": ctx.job_id, "attempt": ctx.attempt, "cancelled": ctx.cancelled}


def not_json() -> object:
    return object()


def test_python_result_is_json() -> None:
    outcome, _, _ = py("common.tasks:echo", args=[1, "a"], kwargs={"k": [True, None]})
    assert outcome.state == "completed"
    assert outcome.result == '{"args":[1,"a"],"kwargs":{"k":[true,null]}}'


def test_python_ctx_is_passed_and_logs() -> None:
    outcome, client, _ = py("tests.unit.test_worker_runners:with_ctx", kwargs={"n": 3})
    assert outcome.result == '{"job":"j1","attempt":1,"cancelled":false}'
    assert lines(client, "o") == ["step 0", "step 1", "step 2"]


def test_python_exception_writes_the_traceback() -> None:
    outcome, client, _ = py("common.tasks:fail", args=["boom"])
    assert (outcome.state, outcome.reason) == ("failed", "exception")
    assert outcome.error == "RuntimeError: boom"
    err = lines(client, "e")
    assert err[0].startswith("Traceback") and err[-1] == "RuntimeError: boom"


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        ("os:getcwd", "not_allowed"),
        ("commonx.tasks:echo", "not_allowed"),
        ("common.tasks:missing", "import_error"),
        ("tests.unit.test_worker_runners:not_json", "result_not_json"),
    ],
)
def test_python_failures(function: str, reason: str) -> None:
    outcome, _, _ = py(function)
    assert (outcome.state, outcome.reason) == ("failed", reason)


def test_python_timeout_applies_when_it_returns() -> None:
    outcome, _, _ = py("common.tasks:sleep", timeout_s=0.05, args=[0.2])
    assert (outcome.state, outcome.reason) == ("failed", "timeout")


def test_python_abort_wins() -> None:
    client, writer = make_writer()
    run = make_run(kind="python", function="common.tasks:noop")
    run.abort(CANCELLED)
    outcome = run_python(run, writer, allowed=ALLOWED, timeout_s=5, line_max_bytes=1024)
    assert outcome.state == "cancelled"
