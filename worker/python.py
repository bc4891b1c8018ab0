"""Python jobs: `"package.module:function"` called in the runner thread.

Only modules on the worker's allow-list run: a module equal to an allowed name or inside
it (`--allow-module tasks` allows `tasks.reports`); `common.tasks` is always allowed.
Arguments are the job's JSON `args` / `kwargs`; the return value must serialize as JSON
(orjson) and is stored as JSON text in the job's `result`.

A function that declares a parameter named `ctx` receives a `JobContext`: `job_id`,
`attempt`, `cancelled` (True once the job is cancelled, timed out or the worker shuts
down), `wait(seconds)` (a sleep that ends early on cancel) and `log(text)`, which writes
to the job's log like stdout does.

LIMITS — read before relying on timeouts. A thread cannot be killed (RELIABILITY.md
finding 11). Cancel, timeout and shutdown are therefore cooperative for python jobs: the
function is told through `ctx.cancelled` and should return soon after. A function that
returns after its deadline fails with reason `timeout` (its result is discarded), but
until it returns it keeps its worker slot. At shutdown, after the grace period, a python
job still running is finished as failed (`worker_shutdown`) and abandoned with the process.
The function shares the worker process: its print() output is not captured (use
ctx.log), and a crash of the interpreter (segfault, os._exit) takes the worker with it. A
job that must be killable belongs in a shell job (e.g. `python -m …`).
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from common.clock import monotonic
from common.scripts import Outcome
from worker.job import JobRun, abort_outcome
from worker.output import LogWriter, text_chunks

BUILTIN_MODULE = "common.tasks"
MAX_RESULT_BYTES = 1024 * 1024


def is_allowed(module: str, allowed: Iterable[str]) -> bool:
    """Whether `module` is one of `allowed` or inside one of them."""
    return any(module == name or module.startswith(name + ".") for name in allowed if name)


class JobContext:
    """What a python job may use to talk to Tidal while it runs."""

    def __init__(self, run: JobRun, writer: LogWriter, deadline: float, line_max: int) -> None:
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
        return self._run.aborted.is_set() or monotonic() >= self._deadline

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once when cancelled; True if the job should stop."""
        left = min(seconds, max(0.0, self._deadline - monotonic()))
        self._run.aborted.wait(left)
        return self.cancelled

    def log(self, text: str) -> None:
        """Write text (one or more lines) to the job's log, as stdout."""
        for line in str(text).split("\n"):
            self._writer.add_chunks("o", text_chunks(line, self._line_max))


def _wants_ctx(func: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _load(function: str, allowed: Iterable[str]) -> Callable[..., Any] | Outcome:
    module_name, _, name = function.partition(":")
    if not is_allowed(module_name, allowed):
        error = f"module {module_name!r} is not on this worker's allow-list"
        return Outcome("failed", None, error=error, reason="not_allowed")
    try:
        func = getattr(importlib.import_module(module_name), name)
    except Exception as exc:
        return Outcome("failed", None, error=f"{type(exc).__name__}: {exc}", reason="import_error")
    if not callable(func):
        return Outcome("failed", None, error=f"{function} is not callable", reason="import_error")
    return func  # type: ignore[no-any-return]


def _encode(value: Any) -> Outcome:
    try:
        text = orjson.dumps(value)
    except TypeError as exc:
        error = f"the result is not JSON: {exc}"
        return Outcome("failed", None, error=error, reason="result_not_json")
    if len(text) > MAX_RESULT_BYTES:
        error = f"the result is {len(text)} bytes, over the {MAX_RESULT_BYTES} limit"
        return Outcome("failed", None, error=error, reason="result_too_large")
    return Outcome("completed", None, result=text.decode())


def run_python(
    run: JobRun,
    writer: LogWriter,
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
    kwargs = dict(run.spec.kwargs)
    if _wants_ctx(func) and "ctx" not in kwargs:
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
