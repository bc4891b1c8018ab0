"""The shell and python runners on real processes, with the log captured in memory."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import orjson
import psutil
import pytest

from common.clock import monotonic
from common.keys import Keys
from common.models import JobSubmission
from tests.support import wait_for
from tests.unit.test_worker_output import FakeClient
from worker import calls
from worker.job import CANCELLED, JobRun, PythonSpec, parse_spec
from worker.output import LogWriter
from worker.python import JobContext, LazyLog, run_python, run_python_isolated
from worker.shell import Limits, run_shell

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


# -- progress and usage -------------------------------------------------------------------


def reports(client: FakeClient) -> list[tuple[str, str, str]]:
    """(percent, stage, message) of each progress.lua call, in order."""
    return [tuple(args[1:4]) for batch in client.batches
            for op, (_keys, args) in batch if op == "progress"]


def entries(client: FakeClient) -> list[str]:
    """Lines and progress reports, in the order the flushes wrote them."""
    return [f"progress {payload[1][1]}" if op == "progress" else payload[1]["l"]
            for batch in client.batches for op, payload in batch if op in ("progress", "xadd")]


def test_shell_progress_lines_are_reports_and_malformed_ones_stay_output() -> None:
    script = ("echo '::tidal progress 10 fetch'; echo out; "
              "echo '::tidal progress 60 build half way there'; "
              "echo '::tidal progres 5'; echo '::tidal progress 101 x'; "
              "echo '::tidal progress 40  two spaces'; echo '::tidal what'; "
              "echo '::tidal progress 7' >&2; "
              "printf '::tidal progress 100 done'")  # no newline at the end
    outcome, client = shell(make_run(command=script))
    assert outcome.state == "completed"
    assert lines(client, "o") == ["out", "::tidal progres 5", "::tidal progress 101 x",
                                  "::tidal progress 40  two spaces", "::tidal what"]
    assert lines(client, "e") == ["::tidal progress 7"]  # only stdout reports progress
    # the first report goes at once; the rest came within 0.1 s of it: a new stage goes at
    # once, and the last report (held back by the rate limit) is written at the end
    assert reports(client)[0] == ("10", "fetch", "")
    assert reports(client)[-1] == ("100", "done", "")
    assert ("60", "build", "half way there") in reports(client)
    order = entries(client)
    assert order.index("progress 10") < order.index("out") < order.index("progress 60")


def test_shell_progress_past_the_output_budget_is_still_seen() -> None:
    client = FakeClient(max_lines=10)
    writer = LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=10)
    run = make_run(command="seq 1 1000; echo '::tidal progress 55 late'; seq 1 10")
    outcome = run_shell(run, writer, timeout_s=10, kill_grace_s=0.5, line_max_bytes=1024)
    writer.close()
    assert outcome.state == "completed"
    assert reports(client) == [("55", "late", "")]


def reporting(ctx: JobContext, steps: int = 3) -> str:
    for i in range(steps + 1):
        ctx.progress(100 * i / steps, "work", f"step {i}")
        ctx.log(f"did {i}")
    return "ok"


def bad_progress(ctx: JobContext) -> None:
    ctx.progress(150)


def test_python_ctx_progress_is_written_fenced_by_the_run_token() -> None:
    outcome, client, run = py("tests.unit.test_worker_runners:reporting")
    assert outcome.state == "completed"
    got = [args for batch in client.batches for op, (_keys, args) in batch if op == "progress"]
    assert got[0][:4] == [run.token, "0", "work", "step 0"]
    assert got[-1][:4] == [run.token, "100", "work", "step 3"]  # the last one, at close
    assert lines(client, "o") == ["did 0", "did 1", "did 2", "did 3"]


def test_python_bad_progress_fails_the_job_with_a_clear_error() -> None:
    outcome, _, _ = py("tests.unit.test_worker_runners:bad_progress")
    assert (outcome.state, outcome.reason) == ("failed", "exception")
    assert outcome.error == "ValueError: progress: percent must be from 0 to 100, not 150"


def test_isolated_python_progress_arrives_as_reports() -> None:
    client, writer = make_writer()
    run = make_run(kind="python", function="tests.unit.test_worker_runners:reporting",
                   kwargs={"steps": 200})
    outcome = run_python_isolated(run, writer, allowed=ALLOWED,
                                  limits=Limits(30, 0.5, 1024))
    writer.close()
    assert outcome.state == "completed", outcome
    assert reports(client)[0] == ("0", "work", "step 0")
    assert reports(client)[-1] == ("100", "work", "step 200")
    assert len(reports(client)) < 50  # rate-limited in the child and in the worker
    assert not any(line.startswith("::tidal") for line in lines(client))
    assert len(lines(client, "o")) == 201


def test_shell_usage_is_measured_for_the_whole_tree() -> None:
    # a child python (under sh, so it is a grandchild of the worker) that touches 60 MB
    # and burns CPU for 0.6 s
    burn = ("import time; b = b'x' * (60 << 20); t = time.process_time()\n"
            "while time.process_time() - t < 0.6: pass")
    outcome, _ = shell(make_run(command=["sh", "-c", f'"{sys.executable}" -c "{burn}"; true']))
    assert outcome.state == "completed"
    usage = dict(outcome.usage)
    assert set(usage) == {"peak_rss_kb", "cpu_s"}
    assert 60 * 1024 <= int(usage["peak_rss_kb"]) < 2 * 1024 * 1024
    assert 0.5 <= float(usage["cpu_s"]) < 30


def test_a_small_job_is_not_charged_the_workers_memory() -> None:
    """The child is forked from this (large) Python process: until its exec it holds the
    worker's pages, which rusage's max RSS would count. A sleeping shell is small."""
    own_kb = psutil.Process().memory_info().rss // 1024
    outcome, _ = shell(make_run(command=["sh", "-c", "sleep 0.4"]))
    usage = dict(outcome.usage)
    assert 0 < int(usage["peak_rss_kb"]) < min(own_kb // 2, 16 * 1024), (usage, own_kb)


def test_a_one_millisecond_job_still_has_its_cpu_time() -> None:
    outcome, _ = shell(make_run(command=["true"]))
    usage = dict(outcome.usage)
    assert float(usage["cpu_s"]) >= 0  # from rusage; no sample was taken: no RSS figure


def test_reports_keep_their_place_among_lines_of_one_read() -> None:
    outcome, client = shell(make_run(command="printf 'a\\n::tidal progress 1\\nb\\n'"))
    assert outcome.state == "completed"
    assert entries(client) == ["a", "progress 1", "b"]


# -- the worker's cheap paths: spec parsing, lazy log, cached lookups ----------------------


def test_plain_python_spec_is_read_without_pydantic() -> None:
    spec = parse_spec(b'{"kind":"python","function":"common.tasks:echo","args":[1],'
                      b'"kwargs":{"a":2},"timeout":3,"retries":2,"retry_delay":0,'
                      b'"queue":"q","tags":{"t":"v"}}')
    assert isinstance(spec, PythonSpec)
    assert (spec.function, spec.args, spec.kwargs, spec.timeout) == (
        "common.tasks:echo", [1], {"a": 2}, 3.0)
    assert (spec.retry_delay, spec.retry_backoff, spec.retry_max_delay) == (0.0, 2.0, 300.0)
    assert (spec.env, spec.cwd, spec.argv()) == ({}, None, [])


@pytest.mark.parametrize("doc", [
    {"kind": "shell", "command": ["true"]},
    {"command": "true"},
    {"kind": "python", "function": "common.tasks:noop", "env": {"A": "1"}},
    {"kind": "python", "function": "common.tasks:noop", "timeout": "5"},  # pydantic's lax
    {"kind": "python", "function": "common.tasks:noop", "timeout": True},  # mode: 1.0
])
def test_other_specs_get_the_full_validation(doc: dict[str, Any]) -> None:
    spec = parse_spec(orjson.dumps(doc))
    assert isinstance(spec, JobSubmission)
    assert spec == JobSubmission.model_validate(doc)


@pytest.mark.parametrize("text", [
    "{not json",
    "[1, 2]",
    '{"kind": "python"}',
    '{"kind": "python", "function": "no colon"}',
    '{"kind": "python", "function": "common.tasks:noop", "timeout": 0}',
    '{"kind": "python", "function": "common.tasks:noop", "retry_backoff": 0.5}',
    '{"kind": "python", "function": "common.tasks:noop", "args": {"a": 1}}',
    '{"kind": "python", "function": "common.tasks:noop", "surprise": 1}',
])
def test_invalid_specs_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(text)


def test_lazy_log_makes_no_writer_until_the_job_writes() -> None:
    made: list[LogWriter] = []
    client = FakeClient()

    def make() -> LogWriter:
        made.append(LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=1000))
        return made[-1]

    quiet = LazyLog(make)
    outcome = run_python(make_run(kind="python", function="common.tasks:noop"), quiet,
                         allowed=ALLOWED, timeout_s=5, line_max_bytes=1024)
    quiet.close()
    assert outcome.state == "completed" and made == [] and quiet.writer is None
    loud = LazyLog(make)
    run = make_run(kind="python", function="tests.unit.test_worker_runners:with_ctx")
    run_python(run, loud, allowed=ALLOWED, timeout_s=5, line_max_bytes=1024)
    loud.close()
    assert len(made) == 1 and made[0].token == "1-0"  # bound as the job started
    assert lines(client, "o") == ["step 0", "step 1"]


def test_function_lookups_are_remembered_but_the_allow_list_is_not() -> None:
    func = calls.load("common.tasks:echo", ALLOWED)
    assert calls.load("common.tasks:echo", ALLOWED) is func
    with pytest.raises(calls.CallFailed) as refused:
        calls.load("common.tasks:echo", ("elsewhere",))
    assert refused.value.reason == "not_allowed"
    assert calls.wants_ctx(with_ctx) and calls.wants_ctx(with_ctx)
    assert not calls.wants_ctx(func)


def test_a_run_makes_its_abort_event_only_when_asked() -> None:
    run = make_run(kind="python", function="common.tasks:noop")
    assert run._aborted is None
    assert run.abort(CANCELLED)
    assert run.aborted.is_set()  # made after the abort: set at once
    other = make_run(kind="python", function="common.tasks:noop")
    event = other.aborted
    assert not event.is_set() and other.abort(CANCELLED) and event.is_set()
