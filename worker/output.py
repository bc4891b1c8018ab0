"""Job output: bytes → lines → batched writes to the job's log stream.

An entry of the job's log stream (`Keys.log`) has the fields the API's log reader expects:

    s  'o' stdout, 'e' stderr, 'x' system (a line the worker wrote, e.g. an exec error)
    t  milliseconds since the epoch when the worker read the line
    l  the text (UTF-8; undecodable bytes become U+FFFD)
    c  '1' only on a chunk of an over-long line that the next entry of the same stream
       continues (lines are split at `log_line_max_bytes`, on a character boundary)

A progress report (`s` = 'p', written by common/lua/progress.lua, fenced like every write of
an attempt) is an entry of the same stream, so it reaches followers in order with the
output and resumes with the same `Last-Event-ID`; it is not an output line (readers show
it as progress, the budget does not count it):

    s  'p'
    t  milliseconds (Redis' clock)
    l  the report as text, `progress 40% compiling: message` (what a reader that does not
       know progress shows)
    pc the percent (text, e.g. `40` or `12.5`); st the stage, m the message ('' for none)

Each attempt has an output budget (`log_max_lines` lines, `log_max_bytes` bytes): past it,
output is counted instead of stored and only its tail is kept (`Overflow`, at C speed, so a
flood like `yes` costs the worker little), then one system line says what was left out:
`[output over this attempt's limit (…): N lines dropped (M bytes), not stored; the last
lines follow]`. Lines dropped because Redis was unreachable for long are reported as
`[N log lines dropped]`.

One flush is ONE round trip (a pipeline of EVALSHAs): log_append.lua appends the lines
(one XADD each, then XTRIM MAXLEN ~ log_max_lines plus the progress entries written, so
progress never pushes output out; one script call per run of lines between progress
reports, and the lines of one stream read at one moment travel joined in one argument,
so a flood costs a few arguments per batch, not four per line) and PUBLISHes the
entry count on the job's log channel (`Keys.log_channel`), a wake-up hint for followers
(pub/sub is at-most-once, the stream is the record: RELIABILITY.md finding 7); each
progress report due is a progress.lua call in its place among the lines. Progress reports
are rate-limited (worker/calls.py `ProgressThrottle`) and some of them are also events
(`progress_event`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis

from common import scripts as sc
from common.backoff import retry_delay_s
from common.clock import monotonic, now_ms
from common.keys import Keys
from common.logging import get_logger
from common.settings import Settings
from worker.calls import ProgressReport, ProgressThrottle

Stream = Literal["o", "e", "x"]
Chunk = tuple[str, bool]  # (text, continued by the next chunk)
# a buffered entry: (stream, ms, text, continued), or ('p', ms, ProgressItem, False)
Item = tuple[str, int, Any, bool]

BATCH_LINES = 1000  # flush at once when this many lines wait
TAIL_LINES = 1000  # at most this many lines of an overflowing stream's tail are kept
MAX_BUFFERED = 10_000  # lines kept while Redis is unreachable; older ones are dropped
CLOSE_TRIES = 3
PROGRESS_STEP = 10  # percent: crossing into another step of this size makes an event …
PROGRESS_EVENTS_MAX = 100  # … and so does a new stage, at most this many per attempt
DEFAULT_EVENTS_MAXLEN: int = Settings.model_fields["events_maxlen"].default

log = get_logger("tidal.worker.output")


def decode(data: bytes) -> str:
    """Bytes of one line as text; binary output never raises."""
    return data.decode("utf-8", errors="replace")


def _cut(data: bytes, limit: int) -> int:
    """Where to cut `data` (longer than `limit`) so no UTF-8 sequence is split."""
    cut = limit
    # step back over continuation bytes (0b10xxxxxx), at most 3, to a lead byte
    while cut > limit - 3 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


class LineSplitter:
    """Turns a byte stream into lines: split on b"\\n", strip a trailing b"\\r", and cut
    lines longer than `max_bytes` into chunks, the earlier ones marked as continued. Holds
    at most `max_bytes` of an unfinished line, however long the line."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(4, max_bytes)
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[Chunk]:
        fast = self._feed_ascii(data)
        if fast is not None:
            return fast
        out: list[Chunk] = []
        self._partial += data
        start = 0
        buf = self._partial
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self._emit(bytes(buf[start:nl]), out)
            start = nl + 1
        rest = bytes(buf[start:])
        while len(rest) > self.max_bytes:
            cut = _cut(rest, self.max_bytes)
            out.append((decode(rest[:cut]), True))
            rest = rest[cut:]
        self._partial = bytearray(rest)
        return out

    def _feed_ascii(self, data: bytes) -> list[Chunk] | None:
        """The common case at C speed (a flood of short lines is ~100,000 a second): the
        complete lines are ASCII and none is over `max_bytes`, so one decode and one split
        make them (the same lines the general path makes). None: take the general path."""
        last = data.rfind(b"\n")
        if last < 0 or not data.isascii():
            return None
        head = bytes(self._partial) + data[:last] if self._partial else data[:last]
        if not head.isascii():
            return None
        texts = head.decode("ascii").split("\n")
        if len(head) > self.max_bytes and max(map(len, texts)) > self.max_bytes:
            return None
        rest = data[last + 1:]
        if len(rest) > self.max_bytes:
            return None
        if b"\r" in head:
            texts = [t[:-1] if t.endswith("\r") else t for t in texts]
        self._partial = bytearray(rest)
        return [(t, False) for t in texts]

    def take_partial(self) -> bytes:
        """Hand over the unfinished line (the stream goes on elsewhere, e.g. an Overflow)."""
        rest, self._partial = bytes(self._partial), bytearray()
        return rest

    def close(self) -> list[Chunk]:
        """The unfinished last line, if any (output that did not end with a newline)."""
        out: list[Chunk] = []
        if self._partial:
            self._emit(bytes(self._partial), out)
            self._partial = bytearray()
        return out

    def _emit(self, line: bytes, out: list[Chunk]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        while len(line) > self.max_bytes:
            cut = _cut(line, self.max_bytes)
            out.append((decode(line[:cut]), True))
            line = line[cut:]
        out.append((decode(line), False))


class Overflow:
    """One stream's output past the attempt's budget: counted with bytes.count (no Python
    call per line), and its last `tail_bytes` kept."""

    def __init__(self, tail_bytes: int) -> None:
        self.tail_bytes = tail_bytes
        self.total = 0
        self.newlines = 0
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self.newlines += data.count(b"\n")
        if self.tail_bytes:
            self._tail += data
            if len(self._tail) > 2 * self.tail_bytes:
                del self._tail[: len(self._tail) - self.tail_bytes]

    def finish(self, line_max_bytes: int) -> tuple[int, int, list[Chunk]]:
        """(bytes, lines) not stored, and the tail as chunks (whole lines only)."""
        tail = bytes(self._tail[-self.tail_bytes:]) if self.tail_bytes else b""
        if len(tail) < self.total:  # cut somewhere: start after the first newline
            tail = tail[tail.find(b"\n") + 1:] if b"\n" in tail else b""
        extra = tail.count(b"\n") - TAIL_LINES
        if extra > 0:
            tail = tail.split(b"\n", extra)[-1]
        skipped = (self.total - len(tail), self.newlines - tail.count(b"\n"))
        splitter = LineSplitter(line_max_bytes)
        return skipped[0], skipped[1], splitter.feed(tail) + splitter.close()


@dataclass(frozen=True, slots=True)
class ProgressItem:
    """A progress report on its way to Redis, and whether it is also an event."""

    report: ProgressReport
    event: bool


class ProgressEvents:
    """Which progress reports also go to the job's events (GET /jobs/{id}/events), so the
    events stream stays small: the first report, then a report whose stage differs from
    the last one sent as an event, or whose percent is in another PROGRESS_STEP (0–9,
    10–19, … 100) than it; at most PROGRESS_EVENTS_MAX per attempt. A job that goes from
    0 to 100 in one stage makes at most 11."""

    def __init__(self) -> None:
        self.count = 0
        self._stage: str | None = None
        self._step = -1

    def __call__(self, report: ProgressReport) -> bool:
        step = int(report.percent // PROGRESS_STEP)
        if self.count >= PROGRESS_EVENTS_MAX or (report.stage == self._stage
                                                 and step == self._step):
            return False
        self.count += 1
        self._stage, self._step = report.stage, step
        return True


def text_chunks(text: str, max_bytes: int) -> list[Chunk]:
    """Lines of a text the worker or a python job logs, cut like process output."""
    splitter = LineSplitter(max_bytes)
    return splitter.feed(text.encode("utf-8", errors="replace")) + splitter.close()


class LogWriter:
    """Batches one job's log lines and writes them to Redis.

    `add` buffers; the buffer is flushed when BATCH_LINES lines wait, when `flush_ms` has
    passed since the first unflushed line (by whoever calls `flush_if_due`: the shell
    reader, or the Flusher thread for python jobs), and by `close` before the job
    finishes. Thread-safe. When Redis is unreachable the lines are kept (up to
    MAX_BUFFERED) and sent with the next flush.

    Budget: once `max_lines` lines or `max_bytes` characters were accepted, `full` is set
    and further lines are only counted; `add_tail` then writes the note of what was left
    out (once) and a bounded tail past the budget.

    Progress: once `bind(token)` gave it the attempt's fencing token, `progress` queues
    reports through the attempt's ProgressThrottle; they are written in order with the
    lines, by progress.lua, in the same flush pipeline. A write refused because the
    attempt no longer owns the job turns progress off for this writer."""

    def __init__(
        self,
        client: Any,
        keys: Keys,
        job_id: str,
        *,
        flush_ms: int,
        max_lines: int,
        max_bytes: int | None = None,
        on_pending: Callable[[], None] | None = None,
        token: str | None = None,
        events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
        scripts: sc.Scripts | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.key = keys.log(job_id)
        self.channel = keys.log_channel(job_id)
        self.job_id = job_id
        self.flush_s = max(flush_ms, 0) / 1000.0
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.on_pending = on_pending
        self.full = False
        self._stored = (0, 0)  # lines, characters accepted within the budget
        self._over = (0, 0)  # lines, bytes past it
        self._noted = False
        self._lines: deque[Item] = deque()
        self._first_at: float | None = None  # monotonic time of the first unflushed line
        self._dropped = 0
        self._closed = False
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.written = 0
        self.token = token
        self.events_maxlen = events_maxlen
        self.progress_written = 0  # progress entries this writer put in the log stream
        self._throttle = ProgressThrottle()
        self._events = ProgressEvents()
        self._progress_off = False
        self._scripts: sc.Scripts | None = scripts  # the worker's; else made on first use

    # -- progress ---------------------------------------------------------------------

    def bind(self, token: str) -> None:
        """The attempt's fencing token (its dispatch entry id): progress writes need it."""
        self.token = token

    def progress(self, report: ProgressReport) -> None:
        """Queue a progress report (rate-limited: see worker/calls.py ProgressThrottle)."""
        with self._lock:
            if self._closed or self._progress_off or self.token is None:
                return
            was_holding = self._throttle.holding
            report_now = self._throttle.offer(report, monotonic())
            if report_now is not None:
                wake = self._queue_progress(report_now)
            else:  # newly held: whoever flushes on time must know when it is due
                wake = self._throttle.holding and not was_holding
        if wake and self.on_pending is not None:
            self.on_pending()

    def _queue_progress(self, report: ProgressReport) -> bool:
        """Put a report in the buffer, in order with the lines (the caller holds the
        lock); True when it is the first thing waiting."""
        self._lines.append(("p", now_ms(), ProgressItem(report, self._events(report)), False))
        first = self._first_at is None
        if first:
            self._first_at = monotonic()
        return first

    def _release_progress(self, *, final: bool = False) -> bool:
        """Move the held report into the buffer if it is due (or `final`); True if moved."""
        with self._lock:
            if self._closed or self._progress_off:
                return False
            now = monotonic()
            report = self._throttle.take_held(now) if final else self._throttle.take_due(now)
            if report is None:
                return False
            self._queue_progress(report)
            return True

    def add(
        self, stream: Stream, text: str, continued: bool = False, *, budget: bool = True
    ) -> None:
        with self._lock:
            if self._closed:
                return
            if budget and not self._within_budget(text):
                return
            if len(self._lines) >= MAX_BUFFERED:
                self._lines.popleft()
                self._dropped += 1
            self._lines.append((stream, now_ms(), text, continued))
            first, full = self._pending()
        self._after_add(first, full)

    def _pending(self) -> tuple[bool, bool]:
        """(the first line since the last flush, the batch is full): with the lock held."""
        first = self._first_at is None
        if first:
            self._first_at = monotonic()
        return first, len(self._lines) >= BATCH_LINES

    def _after_add(self, first: bool, full: bool) -> None:
        """Send a full batch now; tell the flusher about a first line (lock released)."""
        if full:
            self.flush()
        elif first and self.on_pending is not None:
            self.on_pending()

    def add_chunks(self, stream: Stream, chunks: list[Chunk]) -> None:
        """Lines of one stream read at one moment (they share their time): one lock and
        one clock read for all those that stay short of the budget, then line by line for
        the rest (the line that reaches the budget is decided one at a time)."""
        if not chunks:
            return
        with self._lock:
            if self._closed:
                return
            take = 0 if self.full else min(len(chunks), self.max_lines - 1 - self._stored[0],
                                           MAX_BUFFERED - len(self._lines))
            chars = self._stored[1]
            if take > 0 and self.max_bytes is not None:  # chars only count against max_bytes
                chars += sum([len(text) for text, _ in chunks[:take]])
                if chars >= self.max_bytes:
                    take = 0
            first = full = False
            if take > 0:
                self._stored = (self._stored[0] + take, chars)
                ms = now_ms()
                self._lines.extend([(stream, ms, text, cont) for text, cont in chunks[:take]])
                first, full = self._pending()
        self._after_add(first, full)
        for text, continued in chunks[take:] if take > 0 else chunks:
            self.add(stream, text, continued)

    def _within_budget(self, text: str) -> bool:
        """Count a line against the budget (the caller holds the lock)."""
        if self.full:
            self._over = (self._over[0] + 1, self._over[1] + len(text) + 1)
            return False
        lines, chars = self._stored[0] + 1, self._stored[1] + len(text)
        self._stored = (lines, chars)
        self.full = lines >= self.max_lines or (
            self.max_bytes is not None and chars >= self.max_bytes
        )
        return True

    def overflowed(self, nbytes: int, lines: int) -> None:
        """Count output a reader left out past the budget (see Overflow)."""
        with self._lock:
            self._over = (self._over[0] + lines, self._over[1] + nbytes)

    def add_tail(self, stream: Stream, chunks: list[Chunk]) -> None:
        """The note of what was left out (once), then the last lines, past the budget."""
        self._note(tail=bool(chunks))
        for text, continued in chunks:
            self.add(stream, text, continued, budget=False)

    def _note(self, tail: bool = False) -> None:
        with self._lock:
            lines, nbytes = self._over
            if self._noted or (lines == 0 and nbytes == 0):
                return
            self._noted = True
        limit = f"{self.max_lines} lines" + (
            f" / {self.max_bytes} bytes" if self.max_bytes is not None else ""
        )
        follow = "; the last lines follow" if tail else ""
        self.add("x", f"[output over this attempt's limit ({limit}): {lines} lines dropped "
                      f"({nbytes} bytes), not stored{follow}]", budget=False)

    def due_in(self) -> float | None:
        """Seconds until a time-based flush is due (0 if overdue), None if nothing waits
        (a held progress report counts)."""
        first = self._first_at
        now = monotonic()
        lines = None if first is None else max(0.0, first + self.flush_s - now)
        held = self._throttle.due_in(now)
        if held is None or lines is None:
            return held if lines is None else lines
        return min(lines, held)

    def flush_if_due(self) -> None:
        if self._release_progress():
            self.flush()
            return
        first = self._first_at
        if first is not None and monotonic() >= first + self.flush_s:
            self.flush()

    def flush(self) -> bool:
        """Send what waits; True when the buffer is empty afterwards."""
        with self._send_lock:
            with self._lock:
                batch = list(self._lines)
                dropped, self._dropped = self._dropped, 0
                self._lines.clear()
                self._first_at = None
            if dropped:
                batch.insert(0, ("x", now_ms(), f"[{dropped} log lines dropped]", False))
            if not batch:
                return True
            try:
                self._send(batch)
            except redis.RedisError as exc:
                self._put_back(batch)
                log.warning("log flush failed", job_id=self.job_id, error=str(exc))
                return False
            self.written += len(batch)
            return True

    def close(self) -> None:
        """Final flush (a few tries), then refuse further lines. The last progress report
        held back by the rate limit goes out now: the job's last word is always written."""
        self._note()
        self._release_progress(final=True)
        for attempt in range(1, CLOSE_TRIES + 1):
            if self.flush():
                break
            if attempt < CLOSE_TRIES:
                time.sleep(retry_delay_s(attempt, 0.1, 2.0, 1.0))
        with self._lock:
            self._closed = True
            self._lines.clear()
            self._first_at = None

    def _send(self, batch: list[Item]) -> None:
        """ONE round trip: the lines as log_append.lua calls (one per run of lines between
        progress reports, so the order holds), the reports as progress.lua calls."""
        calls: list[sc.Call] = []
        reports: list[int] = []  # where the progress calls are among the calls
        maxlen = self.max_lines + self.progress_written
        lines: list[Any] = []  # log_append.lua's arguments: (s, t, l, c) per run of lines
        run: list[str] = []  # whole lines of one stream and time, joined when the run ends
        run_stream, run_at = "", -1
        for stream, at, text, continued in batch:
            if stream == run_stream and at == run_at and not continued and "\n" not in text:
                run.append(text)
                continue
            if run:
                lines += (run_stream, run_at, "\n".join(run) + "\n", "n")
                run, run_stream = [], ""
            if stream == "p":
                if lines:
                    calls.append(sc.log_append(self.keys, self.job_id, lines, maxlen=maxlen))
                    lines = []
                maxlen += 1
                reports.append(len(calls))
                calls.append(self._progress_call(text, maxlen))
            elif continued or "\n" in text:  # a line of its own, never split
                lines += (stream, at, text, "1" if continued else "")
            else:
                run, run_stream, run_at = [text], stream, at
        if run:
            lines += (run_stream, run_at, "\n".join(run) + "\n", "n")
        calls.append(sc.log_append(self.keys, self.job_id, lines, maxlen=maxlen,
                                   publish=len(batch)))
        if self._scripts is None:
            self._scripts = sc.Scripts(self.client)
        # a refused progress write must not fail (and so resend) the lines around it
        results = self._scripts.run_many(calls, raise_errors=False)
        for n, result in enumerate(results):
            if n not in reports and isinstance(result, Exception):
                raise result
        self.progress_written += len(reports)
        for n in reports:
            self._progress_result(results[n])

    def _progress_call(self, item: ProgressItem, log_maxlen: int) -> sc.Call:
        report = item.report
        return sc.progress(
            self.keys, self.job_id, self.token or "", percent=report.percent_text(),
            stage=report.stage, message=report.message, text=report.text(),
            log_maxlen=log_maxlen, event=item.event, events_maxlen=self.events_maxlen,
        )

    def _progress_result(self, result: Any) -> None:
        if isinstance(result, Exception):
            log.warning("progress write failed", job_id=self.job_id, error=str(result))
        elif result != 1:
            # -1: another attempt owns the job, -2: it is not running, -3: it is gone
            self._progress_off = True
            log.info("progress refused: the attempt no longer owns the job",
                     job_id=self.job_id, code=result)

    def _put_back(self, batch: list[Item]) -> None:
        with self._lock:
            room = MAX_BUFFERED - len(self._lines)
            keep = batch[-room:] if room > 0 else []
            self._dropped += len(batch) - len(keep)
            self._lines.extendleft(reversed(keep))
            if self._lines and self._first_at is None:
                self._first_at = monotonic()


class Flusher:
    """One thread that flushes, on time, the writers of jobs that cannot do it themselves
    (python jobs run their function in the runner thread). Sleeps until the earliest
    writer is due; never wakes up when nothing waits."""

    def __init__(self) -> None:
        self._writers: set[LogWriter] = set()
        self._cond = threading.Condition()
        self._stopped = False

    def add(self, writer: LogWriter) -> None:
        with self._cond:
            self._writers.add(writer)
            writer.on_pending = self.poke

    def remove(self, writer: LogWriter) -> None:
        with self._cond:
            self._writers.discard(writer)
            writer.on_pending = None

    def poke(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                waits = [d for d in (w.due_in() for w in self._writers) if d is not None]
                if not waits or min(waits) > 0:
                    self._cond.wait(min(waits) if waits else None)
                    continue
                writers = list(self._writers)
            for writer in writers:
                writer.flush_if_due()
