"""Built-in python jobs every worker allows, for tests, smoke checks and benchmarks."""

from __future__ import annotations

import time
from typing import Any


def noop() -> None:
    """Do nothing (the benchmark job)."""
    return None


def echo(*args: Any, **kwargs: Any) -> Any:
    """Return what it was given: one argument as itself, more as a list, kwargs as a dict."""
    if kwargs:
        return {"args": list(args), "kwargs": kwargs}
    if len(args) == 1:
        return args[0]
    return list(args)


def sleep(seconds: float = 1.0) -> float:
    """Sleep, then return how long."""
    time.sleep(seconds)
    return seconds


def fail(message: str = "failed on purpose") -> None:
    """Raise, for tests of failure handling."""
    raise RuntimeError(message)
