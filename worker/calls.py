"""Calling a python job's function: the allow-list, the import, the JSON result; and the
progress a job reports (the `::tidal progress` grammar and its rate limit).

Only the standard library and orjson here, so the child interpreter of an isolated python
job (worker/child.py) starts in about 0.1 s instead of the worker's 0.7 s.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

BUILTIN_MODULE = "common.tasks"
MAX_RESULT_BYTES = 1024 * 1024


class CallFailed(Exception):
    """The job cannot be called, or its result cannot be stored."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def is_allowed(module: str, allowed: Iterable[str]) -> bool:
    """Whether `module` is one of `allowed` or inside one of them."""
    return any(module == name or module.startswith(name + ".") for name in allowed if name)


def check_allowed(function: str, allowed: Iterable[str]) -> None:
    module_name = function.partition(":")[0]
    if not is_allowed(module_name, allowed):
        raise CallFailed("not_allowed", f"module {module_name!r} is not on this worker's "
                         "allow-list")


_LOADED: dict[str, Callable[..., Any]] = {}  # "module:function" → the function
_WANTS_CTX: dict[Callable[..., Any], bool] = {}
_CACHE_MAX = 4096  # distinct functions remembered (then the caches start over)


def load(function: str, allowed: Iterable[str]) -> Callable[..., Any]:
    """The function named `"package.module:function"`, if its module is allowed. A
    function found once is remembered (the allow-list is still checked every call)."""
    check_allowed(function, allowed)
    func = _LOADED.get(function)
    if func is not None:
        return func
    module_name, _, name = function.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), name)
    except Exception as exc:
        raise CallFailed("import_error", f"{type(exc).__name__}: {exc}") from exc
    if not callable(func):
        raise CallFailed("import_error", f"{function} is not callable")
    if len(_LOADED) >= _CACHE_MAX:
        _LOADED.clear()
    _LOADED[function] = func
    return func  # type: ignore[no-any-return]


def wants_ctx(func: Callable[..., Any]) -> bool:
    """Whether the function declares a `ctx` parameter (inspect.signature costs ~15 µs,
    so the answer is remembered per function)."""
    try:
        return _WANTS_CTX[func]
    except KeyError:
        pass
    except TypeError:  # an unhashable callable: asked every time
        return _signature_has_ctx(func)
    wants = _signature_has_ctx(func)
    if len(_WANTS_CTX) >= _CACHE_MAX:
        _WANTS_CTX.clear()
    _WANTS_CTX[func] = wants
    return wants


def _signature_has_ctx(func: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def encode(value: Any) -> str:
    """The result as JSON text, within MAX_RESULT_BYTES."""
    try:
        text = orjson.dumps(value)
    except TypeError as exc:
        raise CallFailed("result_not_json", f"the result is not JSON: {exc}") from exc
    if len(text) > MAX_RESULT_BYTES:
        raise CallFailed("result_too_large", f"the result is {len(text)} bytes, over the "
                         f"{MAX_RESULT_BYTES} limit")
    return text.decode()


# -- progress ------------------------------------------------------------------------------
#
# The progress grammar and its rate limit live here, with only the standard library, because
# both sides need them: the worker (JobContext, and the shell reader that recognises
# `::tidal progress` lines) and the child interpreter of an isolated python job, which
# reports by printing such lines.

DIRECTIVE = "::tidal "
PROGRESS_DIRECTIVE = "::tidal progress "
STAGE_MAX = 64  # characters
MESSAGE_MAX = 512  # characters; longer messages are cut
NO_STAGE = "-"  # in a `::tidal progress` line: a message without a stage

PROGRESS_INTERVAL_S = 0.1  # the shortest time between two progress writes …
PROGRESS_SLOWDOWN_EVERY = 600  # … growing by itself once per this many writes of an attempt
STAGE_BURST = 10  # stage changes written at once, inside the interval, per second


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """One progress report: percent (0–100), a stage word ('' for none) and a message."""

    percent: float
    stage: str = ""
    message: str = ""

    def percent_text(self) -> str:
        """The percent as short text: 40, 12.5 (at most 2 decimals)."""
        return f"{round(self.percent, 2):g}"

    def text(self) -> str:
        """How the report reads as a line (the log's `l` field of a progress entry)."""
        words = [f"progress {self.percent_text()}%"]
        if self.stage:
            words.append(self.stage)
        line = " ".join(words)
        return f"{line}: {self.message}" if self.message else line


def progress_report(percent: Any, stage: str | None = None,
                    message: str | None = None) -> ProgressReport:
    """Validate what a python job passes to `ctx.progress`; ValueError names the culprit."""
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise ValueError(f"progress: percent must be a number from 0 to 100, not {percent!r}")
    if not 0 <= percent <= 100:  # also refuses NaN
        raise ValueError(f"progress: percent must be from 0 to 100, not {percent!r}")
    stage = "" if stage is None else str(stage)
    if len(stage) > STAGE_MAX or any(c.isspace() for c in stage) or stage == NO_STAGE:
        raise ValueError(f"progress: stage must be one word of at most {STAGE_MAX} characters "
                         f"without spaces, not {stage!r}")
    text = "" if message is None else " ".join(str(message).split())
    return ProgressReport(float(percent), stage, text[:MESSAGE_MAX])


def progress_line(report: ProgressReport) -> str:
    """The `::tidal progress` line that reports `report` (what an isolated job prints)."""
    line = f"{PROGRESS_DIRECTIVE}{report.percent_text()}"
    if report.stage or report.message:
        line += f" {report.stage or NO_STAGE}"
    return f"{line} {report.message}" if report.message else line


def parse_progress_line(line: str) -> ProgressReport | None:
    """The report a `::tidal progress PERCENT [STAGE [MESSAGE]]` line makes, or None when
    the line is not exactly that (it then stays an ordinary output line). PERCENT is a
    decimal number from 0 to 100, optionally followed by `%`; STAGE one word (`-` for
    none); MESSAGE the rest of the line. Words are separated by spaces."""
    if not line.startswith(PROGRESS_DIRECTIVE):
        return None
    words = line[len(PROGRESS_DIRECTIVE):].split(" ", 2)
    number = words[0].removesuffix("%")
    if not number or not all(c.isdigit() or c == "." for c in number) or number.count(".") > 1 \
            or number.startswith(".") or number.endswith("."):
        return None
    percent = float(number)
    if percent > 100:
        return None
    stage = words[1] if len(words) > 1 else ""
    if len(stage) > STAGE_MAX or any(c.isspace() for c in stage):
        return None
    if not stage and len(words) > 2:  # two spaces in a row: not this grammar
        return None
    message = " ".join(words[2].split())[:MESSAGE_MAX] if len(words) > 2 else ""
    return ProgressReport(percent, "" if stage == NO_STAGE else stage, message)


class ProgressThrottle:
    """The rate limit of one attempt's progress writes, so a job that reports in a tight
    loop costs nothing per call:

    - a report goes out at once when the previous write is at least the interval old
      (PROGRESS_INTERVAL_S, 0.1 s; it grows by 0.1 s after every PROGRESS_SLOWDOWN_EVERY
      writes, so a report a tenth of a second for a day makes ~30,000 writes, not 860,000);
    - a report with a new stage goes out at once even inside the interval (at most
      STAGE_BURST such extra writes per second);
    - any other report is held, a newer one replaces it, and the held one goes out when
      the interval is up (`take_due`, or `take_held` at the end): the last report is always
      written, at most one interval late;
    - a report equal to the last one written is dropped.

    Not thread-safe: the caller holds a lock. Times are monotonic seconds."""

    def __init__(self) -> None:
        self.sent = 0
        self._last: ProgressReport | None = None
        self._last_at = float("-inf")
        self._held: ProgressReport | None = None
        self._tokens = float(STAGE_BURST)
        self._tokens_at = float("-inf")

    @property
    def holding(self) -> bool:
        return self._held is not None

    def interval(self) -> float:
        return PROGRESS_INTERVAL_S * (1 + self.sent // PROGRESS_SLOWDOWN_EVERY)

    def offer(self, report: ProgressReport, now: float) -> ProgressReport | None:
        """The report to write now, or None (held or dropped)."""
        if report == self._last:
            self._held = None
            return None
        if now - self._last_at >= self.interval():
            return self._send(report, now)
        if self._last is not None and report.stage != self._last.stage and self._stage_token(now):
            return self._send(report, now)
        self._held = report
        return None

    def due_in(self, now: float) -> float | None:
        """Seconds until the held report is due (0 if it is), None when none is held."""
        if self._held is None:
            return None
        return max(0.0, self._last_at + self.interval() - now)

    def take_due(self, now: float) -> ProgressReport | None:
        """The held report if its time has come."""
        due = self.due_in(now)
        return self.take_held(now) if due is not None and due <= 0 else None

    def take_held(self, now: float) -> ProgressReport | None:
        """The held report, whatever the time (the attempt is ending)."""
        held, self._held = self._held, None
        return self._send(held, now) if held is not None else None

    def _send(self, report: ProgressReport, now: float) -> ProgressReport:
        self._last, self._last_at, self._held = report, now, None
        self.sent += 1
        return report

    def _stage_token(self, now: float) -> bool:
        self._tokens = min(float(STAGE_BURST),
                           self._tokens + (now - self._tokens_at) * STAGE_BURST)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
