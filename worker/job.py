"""One attempt as the worker holds it while it runs, and how it may be interrupted.

The consumer creates a `JobRun` for each job that start.lua handed over; the runner thread
executes it; the control and heartbeat threads may `abort` it (cancel, lost), and so may the
shutdown path (worker_shutdown: the attempt is then handed back, not finished). Whoever
finishes it first wins `claim_finish`.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from common.models import MAX_ARGS_BYTES, MODULE_FUNC_RE, JobSubmission
from common.scripts import Outcome

CANCELLED = "cancelled"
SHUTDOWN = "worker_shutdown"  # handed back to the queue (reclaim.lua), never finished
LOST = "lost"  # the job was given to another attempt while this worker was away


class Spec(Protocol):
    """What the worker reads of a job's spec: a full `JobSubmission`, or the
    `PythonSpec` that `parse_spec` makes of a plain python job."""

    @property
    def kind(self) -> str: ...
    @property
    def function(self) -> str | None: ...
    @property
    def args(self) -> list[Any]: ...
    @property
    def kwargs(self) -> dict[str, Any]: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def cwd(self) -> str | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def retry_delay(self) -> float: ...
    @property
    def retry_backoff(self) -> float: ...
    @property
    def retry_max_delay(self) -> float: ...

    def argv(self) -> list[str]: ...


class PythonSpec:
    """A python job's spec as the worker needs it, read without pydantic (the spec was
    validated at submission; this takes about half the time of a full validation). A python
    job's spec with `env` or `cwd` is validated in full, so here they are empty."""

    __slots__ = ("args", "function", "kwargs", "retry_backoff", "retry_delay",
                 "retry_max_delay", "timeout")
    kind = "python"
    cwd = None

    def __init__(self, function: str, args: list[Any], kwargs: dict[str, Any],
                 timeout: float | None = None, retry_delay: float = 5.0,
                 retry_backoff: float = 2.0, retry_max_delay: float = 300.0) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.retry_backoff = retry_backoff
        self.retry_max_delay = retry_max_delay

    @property
    def env(self) -> dict[str, str]:
        return {}

    def argv(self) -> list[str]:
        """A python job executes no command."""
        return []


# the keys `parse_spec` reads itself (checked), and those it may leave unread: the
# scheduler and the API use them, the worker does not (a python job's env and cwd, and
# anything unknown, take the full validation)
_KNOWN = frozenset({"kind", "function", "args", "kwargs", "timeout", "retry_delay",
                    "retry_backoff", "retry_max_delay",
                    "queue", "priority", "retries", "host", "depends_on", "resources",
                    "scheduled_at", "stale_after", "idempotency_key", "tags", "callback_url"})
_FUNCTION = re.compile(MODULE_FUNC_RE)
_WEEK_S = 7 * 24 * 3600.0


def parse_spec(spec_json: str | bytes) -> Spec:
    """The spec a job hash holds, as the worker reads it. A plain python job (the common
    case) is read by hand into a PythonSpec, every field the worker uses checked as
    JobSubmission would; anything else goes through JobSubmission's full validation.
    Raises ValueError (pydantic's ValidationError is one) for a spec that is not valid."""
    doc = orjson.loads(spec_json)  # orjson.JSONDecodeError is a ValueError
    fast = _python_spec(doc, len(spec_json)) if type(doc) is dict else None
    return fast if fast is not None else JobSubmission.model_validate(doc)


def _number(value: Any, low: float, high: float, low_ok: bool = True) -> float | None:
    """`value` as a float when it is a JSON number within JobSubmission's bounds."""
    if type(value) is not int and type(value) is not float:
        return None
    if low < value <= high or (low_ok and value == low):
        return float(value)
    return None


def _python_spec(doc: dict[str, Any], size: int) -> PythonSpec | None:
    """A PythonSpec when `doc` is a plain python job whose fields check out; None to leave
    the verdict (and its error message) to the full validation."""
    if doc.get("kind") != "python" or size > MAX_ARGS_BYTES or not _KNOWN.issuperset(doc):
        return None
    function, args, kwargs = doc.get("function"), doc.get("args", []), doc.get("kwargs", {})
    if type(function) is not str or len(function) > 256 or not _FUNCTION.match(function):
        return None
    if type(args) is not list or type(kwargs) is not dict:
        return None
    spec = PythonSpec(function, args, kwargs)
    if len(doc) == 2:  # kind and function only: every other field has its default
        return spec
    if (timeout := doc.get("timeout")) is not None:
        if (value := _number(timeout, 0.0, _WEEK_S, low_ok=False)) is None:
            return None
        spec.timeout = value
    for key, low, high in (("retry_delay", 0.0, 24 * 3600.0),
                           ("retry_backoff", 1.0, 10.0),
                           ("retry_max_delay", 0.0, _WEEK_S)):
        if key in doc:
            if (value := _number(doc[key], low, high)) is None:
                return None
            setattr(spec, key, value)
    return spec


@dataclass(eq=False)
class JobRun:
    job_id: str
    queue: str
    token: str  # the dispatch entry id: the attempt's fencing token
    attempt: int
    spec: Spec
    owner: str = ""  # who submitted it ('' unknown: its end then goes to the settle stream)
    # monotonic time a heartbeat that found this attempt still ours was sent (its lease)
    confirmed_at: float = field(default=float("-inf"), init=False)
    abort_reason: str | None = field(default=None, init=False)
    # monotonic time its runner began executing it (None: not yet)
    began_at: float | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _finished: bool = field(default=False, init=False, repr=False)
    _wake: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _aborted: threading.Event | None = field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def aborted(self) -> threading.Event:
        """Set once the run is asked to stop. Made on first use: most runs never wait on
        it, and an Event costs more than the rest of a JobRun."""
        event = self._aborted
        if event is None:
            with self._lock:
                if self._aborted is None:
                    self._aborted = threading.Event()
                    if self.abort_reason is not None:
                        self._aborted.set()
                event = self._aborted
        return event

    def abort(self, reason: str) -> bool:
        """Ask the run to stop (the first reason wins); False if it was already asked."""
        with self._lock:
            if self.abort_reason is not None or self._finished:
                return False
            self.abort_reason = reason
            if self._aborted is not None:
                self._aborted.set()
            if self._wake is not None:
                try:
                    os.write(self._wake[1], b"x")
                except OSError:
                    pass
            return True

    def claim_finish(self) -> bool:
        """True exactly once: the caller then owns the call to finish.lua."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            return True

    def open_wake(self) -> int:
        """A descriptor that turns readable when the run is aborted (for select loops)."""
        with self._lock:
            if self._wake is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                self._wake = (r, w)
                if self.abort_reason is not None:
                    os.write(w, b"x")
            return self._wake[0]

    def close_wake(self) -> None:
        with self._lock:
            if self._wake is not None:
                os.close(self._wake[0])
                os.close(self._wake[1])
                self._wake = None


def abort_outcome(reason: str) -> Outcome:
    """The outcome of a run stopped on purpose."""
    if reason == CANCELLED:
        return Outcome("cancelled", error="cancelled", reason=CANCELLED)
    if reason == SHUTDOWN:
        return Outcome("failed", error="the worker shut down", reason=SHUTDOWN)
    return Outcome("failed", error=f"stopped: {reason}", reason=reason)
