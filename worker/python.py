"""Python jobs: `"package.module:function"` called in the runner thread, or, with
`TIDAL_PYTHON_ISOLATION=process`, in a child interpreter (worker/child.py).

Only modules on the worker's allow-list run: a module equal to an allowed name or inside
it (`--allow-module tasks` allows `tasks.reports`); `common.tasks` is always allowed.
Arguments are the job's JSON `args` / `kwargs`; the return value must serialize as JSON
(orjson) and is stored as JSON text in the job's `result`.

A function that declares a parameter named `ctx` receives a `JobContext`: `job_id`,
`attempt`, `cancelled` (True once the job is cancelled, timed out or the worker shuts
down), `wait(seconds)` (a sleep that ends early on cancel), `log(text)`, which writes
to the job's log like stdout does, and `progress(percent, stage=None, message=None)`:
percent from 0 to 100, stage one word (at most 64 characters, no spaces), message one
line (cut at 512 characters); anything else raises ValueError. Progress is rate-limited
(worker/calls.py `ProgressThrottle`), so calling it in a tight loop costs no round trip
per call; the last report is always written. In process mode the child prints the
report as a `::tidal progress` line, which the worker reads like a shell job's.

Thread mode (the default) — read before relying on timeouts. A thread cannot be killed
(RELIABILITY.md finding 11). Cancel, timeout and shutdown are therefore cooperative: the
function is told through `ctx.cancelled` and should return soon after. A function that
returns after its deadline fails with reason `timeout` (its result is discarded), but
until it returns it keeps its worker slot. At shutdown, after the grace period, a python
job still running is handed back to the queue and abandoned with the process. The
function shares the worker process: its print() output is not captured (use ctx.log), and
a crash of the interpreter (segfault, os._exit) takes the worker with it; the job is then
requeued by the reaper and, lost that way more than `max_deliveries` times, fails as
`poison`.

Process mode: each attempt is a child interpreter run like a shell job (own process
group and pids cgroup, output captured, print() included). Timeout, cancel and shutdown
are SIGTERM (ctx.cancelled turns True) then SIGKILL after `kill_grace_s`: always
enforced. A crash fails only that job, with reason `crashed`. It costs about 0.1 s of
start-up per job, and arguments and results cross the process boundary as JSON.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from common.clock import monotonic
from common.scripts import Outcome
from worker import calls
from worker.calls import BUILTIN_MODULE, MAX_RESULT_BYTES, ProgressReport, is_allowed
from worker.job import JobRun, abort_outcome
from worker.output import LogWriter, Stream, text_chunks
from worker.shell import Limits, job_env, run_process

__all__ = ["BUILTIN_MODULE", "MAX_RESULT_BYTES", "JobContext", "LazyLog", "is_allowed",
           "run_python", "run_python_isolated"]


class LazyLog:
    """A job's LogWriter, made only when the job first writes to its log: most python
    jobs never do, and a writer costs more to make than such a job costs to run. Lines
    and progress go to the writer in the order they come, as if it had always been
    there. `close` closes the writer if there is one."""

    def __init__(self, make: Callable[[], LogWriter]) -> None:
        self._make = make
        self._writer: LogWriter | None = None
        self._token: str | None = None
        self._lock = threading.Lock()

    @property
    def writer(self) -> LogWriter | None:
        """The writer, if one was made."""
        return self._writer

    def get(self) -> LogWriter:
        writer = self._writer
        if writer is None:
            with self._lock:  # a job may log from threads of its own
                if self._writer is None:
                    made = self._make()
                    if self._token is not None:
                        made.bind(self._token)
                    self._writer = made
                writer = self._writer
        return writer

    def bind(self, token: str) -> None:
        with self._lock:
            self._token = token
            if self._writer is not None:
                self._writer.bind(token)

    def add(self, stream: Stream, text: str) -> None:
        self.get().add(stream, text)

    def add_chunks(self, stream: Stream, chunks: list[tuple[str, bool]]) -> None:
        self.get().add_chunks(stream, chunks)

    def progress(self, report: ProgressReport) -> None:
        self.get().progress(report)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class JobContext:
    """What a python job may use to talk to Tidal while it runs."""

    def __init__(self, run: JobRun, writer: LogWriter | LazyLog, deadline: float,
                 line_max: int) -> None:
        self._run = run
        self._writer = writer
        self._deadline = deadline
        self._line_max = line_max

    @property
    def job_id(self) -> str:
        return self._run.job_id

    @property
    def attempt(self) -> int:
        return self._run.attempt

    @property
    def cancelled(self) -> bool:
        """True once the function should stop: cancelled, timed out, or shutting down."""
        return self._run.abort_reason is not None or monotonic() >= self._deadline

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once when cancelled; True if the job should stop."""
        left = min(seconds, max(0.0, self._deadline - monotonic()))
        self._run.aborted.wait(left)
        return self.cancelled

    def log(self, text: str) -> None:
        """Write text (one or more lines) to the job's log, as stdout."""
        for line in str(text).split("\n"):
            self._writer.add_chunks("o", text_chunks(line, self._line_max))

    def progress(self, percent: float, stage: str | None = None,
                 message: str | None = None) -> None:
        """Report how far the job is: shown live to followers, in the job document and
        (at coarse steps) in its events. Cheap to call often: writes are rate-limited."""
        self._writer.progress(calls.progress_report(percent, stage, message))


def _load(function: str, allowed: Iterable[str]) -> Callable[..., Any] | Outcome:
    try:
        return calls.load(function, allowed)
    except calls.CallFailed as exc:
        return Outcome("failed", None, error=exc.error, reason=exc.reason)


def _encode(value: Any) -> Outcome:
    try:
        return Outcome("completed", None, result=calls.encode(value))
    except calls.CallFailed as exc:
        return Outcome("failed", None, error=exc.error, reason=exc.reason)


def run_python(
    run: JobRun,
    writer: LogWriter | LazyLog,
    *,
    allowed: Iterable[str],
    timeout_s: float,
    line_max_bytes: int,
) -> Outcome:
    """Call the job's function and say how it ended."""
    func = _load(run.spec.function or "", allowed)
    if isinstance(func, Outcome):
        writer.add("x", func.error)
        return func
    deadline = monotonic() + timeout_s
    writer.bind(run.token)
    kwargs = dict(run.spec.kwargs)
    if calls.wants_ctx(func) and "ctx" not in kwargs:
        kwargs["ctx"] = JobContext(run, writer, deadline, line_max_bytes)
    try:
        value = func(*run.spec.args, **kwargs)
    except BaseException as exc:  # noqa: B036 - a job's SystemExit must not kill the runner
        for line in "".join(traceback.format_exception(exc)).rstrip("\n").split("\n"):
            writer.add_chunks("e", text_chunks(line, line_max_bytes))
        outcome = Outcome("failed", None, error=f"{type(exc).__name__}: {exc}", reason="exception")
    else:
        outcome = _encode(value)
    if run.abort_reason is not None:
        return abort_outcome(run.abort_reason)
    if monotonic() > deadline:
        return Outcome("failed", None, error=f"timed out after {timeout_s:g}s", reason="timeout")
    return outcome


# -- process mode -----------------------------------------------------------------------------


def child_env(run: JobRun) -> dict[str, str]:
    """The job's environment, with the worker's import path (allowed modules and the
    worker package are found as in the worker)."""
    env = job_env(run)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python_isolated(
    run: JobRun, writer: LogWriter, *, allowed: Iterable[str], limits: Limits
) -> Outcome:
    """Run the job's function in a child interpreter and say how it ended."""
    try:  # refused before anything starts
        calls.check_allowed(run.spec.function or "", allowed)
    except calls.CallFailed as exc:
        writer.add("x", exc.error)
        return Outcome("failed", None, error=exc.error, reason=exc.reason)
    tmp = Path(tempfile.mkdtemp(prefix=f"tidal-{run.job_id}-"))
    try:
        call_path, result_path = tmp / "call.json", tmp / "result.json"
        call_path.write_bytes(orjson.dumps({
            "function": run.spec.function, "args": run.spec.args, "kwargs": run.spec.kwargs,
            "allowed": list(allowed), "job_id": run.job_id, "attempt": run.attempt,
            "timeout_s": limits.timeout_s,
        }))
        argv = [sys.executable, "-m", "worker.child", str(call_path), str(result_path)]
        done = run_process(run, writer, argv, child_env(run), limits)
        if isinstance(done, Outcome):
            return done
        outcome = done.outcome()
        if done.kill_reason is not None or outcome.reason == "pids_limit":
            return outcome
        return replace(_child_outcome(result_path, outcome), usage=outcome.usage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _child_outcome(result_path: Path, process: Outcome) -> Outcome:
    """The function's outcome from RESULT, or `crashed` when the child left none."""
    try:
        doc = orjson.loads(result_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        how = f"exited with {process.exit_code}" if process.reason == "exit_code" else (
            f"was {process.error}" if process.error else "ended")
        error = f"the python process {how} before the function returned"
        return Outcome("failed", process.exit_code, error=error, reason="crashed")
    if doc.get("ok"):
        return Outcome("completed", None, result=str(doc["result"]))
    return Outcome("failed", None, error=str(doc.get("error")), reason=str(doc.get("reason")))
