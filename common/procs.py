"""Children that do not outlive their parent.

Linux's prctl(PR_SET_PDEATHSIG) asks the kernel to signal a child when the thread that
forked it ends, even by SIGKILL: `tidal up`'s services, and the servers and services a
test or the benchmark starts, go with the process that started them instead of running on
after it (a test run killed by its time limit used to leave valkey-servers behind).

The signal follows the forking *thread*, so it is only armed for children started from
the main thread; from any other thread `die_with_parent()` gives None. prctl is looked up
here, in the parent, so the child between fork and exec only makes the call (no dlopen,
whose lock another thread may hold at fork)."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _arm() -> None:
    assert _prctl is not None
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child get SIGTERM when this process dies, or None where
    that cannot be armed safely (not Linux, or not called from the main thread)."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    return _arm
