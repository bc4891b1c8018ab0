"""One attempt as the worker holds it while it runs, and how it may be interrupted.

The consumer creates a `JobRun` for each job that start.lua handed over; the runner thread
executes it; the control and heartbeat threads may `abort` it (cancel, lost), and so may the
shutdown path (worker_shutdown: the attempt is then handed back, not finished). Whoever
finishes it first wins `claim_finish`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from common.models import JobSubmission
from common.scripts import Outcome

CANCELLED = "cancelled"
SHUTDOWN = "worker_shutdown"  # handed back to the queue (reclaim.lua), never finished
LOST = "lost"  # the job was given to another attempt while this worker was away


@dataclass(eq=False)
class JobRun:
    job_id: str
    queue: str
    token: str  # the dispatch entry id: the attempt's fencing token
    attempt: int
    spec: JobSubmission
    aborted: threading.Event = field(default_factory=threading.Event, init=False)
    # monotonic time a heartbeat that found this attempt still ours was sent (its lease)
    confirmed_at: float = field(default=float("-inf"), init=False)
    abort_reason: str | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _finished: bool = field(default=False, init=False, repr=False)
    _wake: tuple[int, int] | None = field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def abort(self, reason: str) -> bool:
        """Ask the run to stop (the first reason wins); False if it was already asked."""
        with self._lock:
            if self.abort_reason is not None or self._finished:
                return False
            self.abort_reason = reason
            self.aborted.set()
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
