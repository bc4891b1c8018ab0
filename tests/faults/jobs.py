"""Python jobs the fault tests and the worker isolation tests submit. Light on purpose:
an isolated job imports this module in a fresh interpreter."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any


def crash(code: int = 1) -> None:
    """End the interpreter at once, as a buggy C extension or a stray os._exit would."""
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def chatty(n: int = 3) -> int:
    """print() to stdout and stderr (captured only in an isolated job)."""
    for i in range(n):
        print(f"out {i}")
    print("err", file=sys.stderr)
    return n


def stubborn(seconds: float = 60.0) -> None:
    """Ignores every cooperative hint: only a kill stops it."""
    time.sleep(seconds)


def cooperative(ctx: Any) -> dict[str, Any]:
    ctx.log("waiting")
    stopped = ctx.wait(60.0)
    return {"job": ctx.job_id, "attempt": ctx.attempt, "stopped": stopped}


def ledger(path: str, job: str, seconds: float = 0.0, host: str = "") -> str:
    """Append `start` and `end` lines (pid, monotonic ns) to a ledger file, O_APPEND."""
    attempt = os.environ.get("TIDAL_ATTEMPT", "?")
    write_line(path, f"start {job} {attempt} {os.getpid()} {time.monotonic_ns()} {host}")
    time.sleep(seconds)
    write_line(path, f"end {job} {attempt} {os.getpid()} {time.monotonic_ns()} {host}")
    return job


def write_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
