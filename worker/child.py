"""`python -m worker.child CALL RESULT`: one isolated python job in its own interpreter.

The worker (worker/python.py, `TIDAL_PYTHON_ISOLATION=process`) writes CALL, a JSON file
`{"function", "args", "kwargs", "allowed", "job_id", "attempt", "timeout_s"}`, and runs this
as a process group like a shell job: stdout and stderr (print() included) go to the job's
log, a timeout, cancel or shutdown is SIGTERM then SIGKILL. This writes RESULT atomically:
`{"ok": true, "result": "<JSON text>"}` or `{"ok": false, "reason", "error"}`. No RESULT
means the interpreter died before the function returned (`os._exit`, a segfault, a kill),
and only this job fails, not the worker.

`ctx.progress()` prints a `::tidal progress` line (worker/calls.py), rate-limited here with
the worker's own rule, so a tight loop of reports does not flood the pipe; a report held
back is printed by a timer when it is due, and at the latest when the function returns.

Only the standard library, orjson and worker/calls.py are imported here: it starts fast.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from worker.calls import (
    CallFailed,
    ProgressThrottle,
    encode,
    load,
    progress_line,
    progress_report,
    wants_ctx,
)


class ChildContext:
    """The `ctx` of an isolated job: the same surface as worker.python.JobContext."""

    def __init__(self, job_id: str, attempt: int, timeout_s: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self._deadline = time.monotonic() + timeout_s
        self._stop = threading.Event()
        self._throttle = ProgressThrottle()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        """True once the function should stop: cancelled, timed out, or shutting down."""
        return self._stop.is_set() or time.monotonic() >= self._deadline

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once when cancelled; True if the job should stop."""
        self._stop.wait(min(seconds, max(0.0, self._deadline - time.monotonic())))
        return self.cancelled

    def log(self, text: str) -> None:
        """Write text (one or more lines) to the job's log, as stdout."""
        print(text, flush=True)

    def progress(self, percent: float, stage: str | None = None,
                 message: str | None = None) -> None:
        """Report how far the job is (validated and rate-limited like in the worker)."""
        report = progress_report(percent, stage, message)
        with self._lock:
            now = self._throttle.offer(report, time.monotonic())
            if now is not None:
                print(progress_line(now), flush=True)
                return
            due = self._throttle.due_in(time.monotonic())
            if due is not None and self._timer is None:
                self._timer = threading.Timer(due, self._print_due)
                self._timer.daemon = True
                self._timer.start()

    def _print_due(self) -> None:
        with self._lock:
            self._timer = None
            if (report := self._throttle.take_held(time.monotonic())) is not None:
                print(progress_line(report), flush=True)

    def close(self) -> None:
        """The function returned: print the report still held back, if any."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if (report := self._throttle.take_held(time.monotonic())) is not None:
                print(progress_line(report), flush=True)


def call(doc: dict[str, Any]) -> dict[str, Any]:
    """Run the job's function; the RESULT document."""
    try:
        func = load(doc["function"], doc["allowed"])
        kwargs = dict(doc.get("kwargs") or {})
        ctx = None
        if wants_ctx(func) and "ctx" not in kwargs:
            ctx = kwargs["ctx"] = ChildContext(doc["job_id"], doc["attempt"], doc["timeout_s"])
        try:
            value = func(*(doc.get("args") or []), **kwargs)
        except BaseException as exc:  # noqa: B036 - a job's SystemExit is its failure
            traceback.print_exception(exc, file=sys.stderr)
            return {"ok": False, "reason": "exception", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            if ctx is not None:
                ctx.close()
        return {"ok": True, "result": encode(value)}
    except CallFailed as exc:
        print(exc.error, file=sys.stderr)
        return {"ok": False, "reason": exc.reason, "error": exc.error}


def main(argv: list[str]) -> int:
    call_path, result_path = Path(argv[1]), Path(argv[2])
    doc = orjson.loads(call_path.read_bytes())
    outcome = call(doc)
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = result_path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(outcome))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
