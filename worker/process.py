"""Process-group helpers for shell jobs.

Every job runs in its own session and process group (`start_new_session=True`; never
`preexec_fn` in a threaded worker: RELIABILITY.md finding 10), so the whole tree is
signalled with one `killpg`. The group id is the leader's pid; it is only signalled while
the leader is alive or an unreaped zombie, which keeps the pid from being reused. Processes
that left the group (setsid) are found as descendants with psutil while their parents live.
"""

from __future__ import annotations

import os
import signal

import psutil


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to every process of the group; False if none was there."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of `pid` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def kill_all(procs: list[psutil.Process], sig: int) -> None:
    """Signal processes found earlier, skipping those that ended (psutil checks the
    creation time, so a reused pid is not hit)."""
    for proc in procs:
        try:
            if proc.is_running():
                proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux ≥ 5.3), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def has_exited(pid: int) -> bool:
    """Whether the child `pid` has ended, without reaping it (so its pid stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid == pid


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
