"""Shell jobs: one process group per attempt, both pipes read in the runner thread.

- The job runs in a new session (`start_new_session=True`), so its process group holds the
  whole tree unless a process leaves it on purpose; such escapees are found with psutil.
- stdout and stderr are read as bytes with `selectors` + `os.read` on non-blocking
  descriptors (64 KiB reads), together with a pidfd (exit) and the run's wake pipe
  (cancel / shutdown), so one thread serves everything with no polling.
- Timeout, cancel or shutdown: SIGTERM to the group, `kill_grace_s` later SIGKILL to the
  group and to every descendant seen. Once the leader has exited, the pipes are drained for
  at most DRAIN_S: a grandchild that keeps them open cannot hang the runner (RELIABILITY.md
  finding 10).
- When a job ends, whatever is left of its process group is killed: no process of a
  finished job outlives it.
- Exec failures (missing command or cwd, permission denied, E2BIG …) fail the job with
  reason `exec_error` and a `system` log line; the worker keeps serving.
- With a pids cgroup (worker/cgroup.py) the job is spawned inside it, every process in it
  is killed when the job ends, and a job that hit the cgroup's `pids.max` fails with
  reason `pids_limit` (a fork bomb), whatever its exit code.
- Output past the attempt's budget is counted, not stored; its tail is kept (`Overflow`).
- Progress: a stdout line `::tidal progress PERCENT [STAGE [MESSAGE]]` (grammar in
  worker/calls.py `parse_progress_line`) is a progress report, not output; a line that
  starts with `::tidal` but does not parse stays an ordinary line. Past the output budget
  the last whole report line of each read is still recognised.
- Usage: the tree's RSS (summed over its processes) and CPU are sampled every
  SAMPLE_EVERY_S with psutil, and the leader is reaped with wait4, whose rusage covers it
  and every descendant reaped below it; the outcome carries `peak_rss_kb` (the peak
  sampled sum: rusage's max RSS would count the worker's memory the forked child held
  until its exec) and `cpu_s` (user + system, the larger of the sampled sum and
  rusage's). A job that ends within the first sample has CPU from rusage and no RSS.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import IO

import psutil

from common.clock import monotonic
from common.scripts import Outcome
from worker import process as pg
from worker.calls import DIRECTIVE, PROGRESS_DIRECTIVE, parse_progress_line
from worker.cgroup import JobCgroup
from worker.job import JobRun, abort_outcome
from worker.output import Chunk, LineSplitter, LogWriter, Overflow, Stream, decode

READ_BYTES = 64 * 1024
DRAIN_S = 1.0  # how long pipes may stay open after the leader exited
REAP_S = 10.0  # bound on waiting for a SIGKILLed leader to be reaped
SAMPLE_FIRST_S = 0.1  # the process tree's first usage sample, after the start …
SAMPLE_EVERY_S = 0.5  # … then one this often
_PROGRESS_BYTES = PROGRESS_DIRECTIVE.encode()
# never handed to jobs: credentials of the worker itself
SECRET_ENV = ("TIDAL_TOKEN", "TIDAL_REDIS_URL", "TIDAL_DATABASE_URL")

_STOP_NOTE = {
    "timeout": "timed out after {timeout:g}s: stopping the process group",
    "cancelled": "cancelled: stopping the process group",
    "worker_shutdown": "the worker is shutting down: stopping the process group",
    "lost": "another attempt owns this job now: stopping the process group",
}


@dataclass(frozen=True)
class Limits:
    """How one process-group attempt is bounded."""

    timeout_s: float
    kill_grace_s: float
    line_max_bytes: int
    tail_bytes: int = 64 * 1024
    cgroup: JobCgroup | None = None
    # asked right before the spawn: False means the attempt is no longer ours
    may_start: Callable[[], bool] | None = None


def job_env(run: JobRun) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(run.spec.env)
    env["TIDAL_JOB_ID"] = run.job_id
    env["TIDAL_ATTEMPT"] = str(run.attempt)
    return env


def run_shell(
    run: JobRun,
    writer: LogWriter,
    *,
    timeout_s: float,
    kill_grace_s: float,
    line_max_bytes: int,
    tail_bytes: int = 64 * 1024,
    cgroup: JobCgroup | None = None,
) -> Outcome:
    """Run one shell attempt to its end and say how it ended."""
    limits = Limits(timeout_s, kill_grace_s, line_max_bytes, tail_bytes, cgroup)
    done = run_process(run, writer, run.spec.argv(), job_env(run), limits)
    return done if isinstance(done, Outcome) else done.outcome()


def run_process(
    run: JobRun, writer: LogWriter, argv: list[str], env: dict[str, str], limits: Limits
) -> ShellSession | Outcome:
    """Start `argv` in a new session (inside the attempt's cgroup, if any) and pump it to
    its end; the finished session, or the outcome of an exec error (or of a start that
    `may_start` refused, asked as late as possible)."""
    writer.bind(run.token)
    try:
        with limits.cgroup.entered() if limits.cgroup else nullcontext():
            if limits.may_start is not None and not limits.may_start():
                return Outcome("failed", None, error="not started: the attempt is no longer "
                               "this worker's", reason="lost")
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd=run.spec.cwd,
                env=env,
            )
    except (OSError, ValueError) as exc:
        text = f"cannot execute {argv[0]!r}: {exc}"
        writer.add("x", text, budget=False)
        return Outcome("failed", None, error=text, reason="exec_error")
    session = ShellSession(proc, run, writer, limits)
    try:
        session.pump()
    finally:
        session.cleanup()
    return session


class TreeUsage:
    """What a process tree used: peak RSS (the largest sum over its live processes seen at
    one sample) and CPU seconds (user + system, each process's last sample, added up)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kb = 0
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, start time) → seconds

    def sample(self) -> None:
        try:
            leader = psutil.Process(self.pid)
            procs = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    mem, cpu = proc.memory_info().rss, proc.cpu_times()
                    self._cpu[(proc.pid, proc.create_time())] = cpu.user + cpu.system
            except psutil.Error:  # ended meanwhile, or a zombie
                continue
            rss += mem
        self.peak_rss_kb = max(self.peak_rss_kb, rss // 1024)

    def fields(self, rusage: os.struct_rusage | None) -> tuple[tuple[str, str], ...]:
        """`peak_rss_kb` (sampled only) and `cpu_s`, with the reaped leader's rusage CPU
        folded in. rusage's max RSS is not used: the child was forked from the worker, so
        it counts the worker's own memory, copied into the child until its exec (a
        `sh -c 'sleep 1'` would show the worker's ~60 MB). A job that ended before the
        first sample therefore has no peak RSS figure."""
        cpu = sum(self._cpu.values())
        if rusage is not None:
            cpu = max(cpu, rusage.ru_utime + rusage.ru_stime)
        out = (("cpu_s", f"{cpu:.3f}"),)
        return ((("peak_rss_kb", str(self.peak_rss_kb)),) + out) if self.peak_rss_kb else out


class ShellSession:
    """The select loop of one running process group."""

    def __init__(
        self, proc: subprocess.Popen[bytes], run: JobRun, writer: LogWriter, limits: Limits
    ) -> None:
        self.proc, self.run, self.writer, self.limits = proc, run, writer, limits
        self.pgid = proc.pid  # a new session: the leader's pid is the group id
        self.timeout_s, self.kill_grace_s = limits.timeout_s, limits.kill_grace_s
        self.deadline = monotonic() + limits.timeout_s
        self.cgroup = limits.cgroup
        self.limit_hits = 0  # forks refused at the cgroup's pids.max
        self.kill_reason: str | None = None
        self.kill_at: float | None = None  # when SIGKILL follows the SIGTERM
        self.killed = False
        self.drain_until: float | None = None
        self.exited = False
        self.tree: list[psutil.Process] = []
        self.usage = TreeUsage(proc.pid)
        self.rusage: os.struct_rusage | None = None
        self.next_sample = monotonic() + SAMPLE_FIRST_S
        self.midline: dict[int, bool] = {}  # per pipe: its last chunk is continued
        self.sel = selectors.DefaultSelector()
        self.splitters: dict[int, tuple[Stream, LineSplitter]] = {}
        self.overflows: dict[Stream, Overflow] = {}
        assert proc.stdout is not None and proc.stderr is not None
        pipes: list[tuple[Stream, IO[bytes]]] = [("o", proc.stdout), ("e", proc.stderr)]
        for stream, pipe in pipes:
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, "pipe")
            self.splitters[fd] = (stream, LineSplitter(limits.line_max_bytes))
        self.pidfd = pg.pidfd(proc.pid)
        if self.pidfd is not None:
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.wake = run.open_wake()
        self.sel.register(self.wake, selectors.EVENT_READ, "wake")

    # -- the loop ----------------------------------------------------------------------

    def pump(self) -> None:
        while not self._done():
            for key, _ in self.sel.select(self._timeout()):
                if key.data == "pipe":
                    self._read(key.fd)
                elif key.data == "exit":
                    self._mark_exited()
                else:
                    self._drain_wake()
            self._tick()

    def _done(self) -> bool:
        if not self.exited:
            return False
        if not self.splitters:
            return True
        return self.drain_until is not None and monotonic() >= self.drain_until

    def _tick(self) -> None:
        now = monotonic()
        if not self.exited and self.pidfd is None and pg.has_exited(self.proc.pid):
            self._mark_exited()
        if self.kill_reason is None and not self.exited:
            if self.run.abort_reason is not None:
                self._terminate(self.run.abort_reason)
            elif now >= self.deadline:
                self._terminate("timeout")
        if self.kill_at is not None and not self.killed and now >= self.kill_at:
            self._kill()
        if not self.exited and now >= self.next_sample:
            self.usage.sample()
            self.next_sample = monotonic() + SAMPLE_EVERY_S
        if self.exited and self.splitters and self.drain_until is None:
            self.drain_until = now + DRAIN_S
        self.writer.flush_if_due()

    def _timeout(self) -> float:
        now = monotonic()
        waits = [1.0]
        if not self.exited:
            if self.pidfd is None:
                waits.append(0.05)
            if self.kill_reason is None:
                waits.append(self.deadline - now)
            waits.append(self.next_sample - now)
        if self.kill_at is not None and not self.killed:
            waits.append(self.kill_at - now)
        if self.drain_until is not None:
            waits.append(self.drain_until - now)
        due = self.writer.due_in()
        if due is not None:
            waits.append(due)
        return max(0.0, min(waits))

    # -- events ------------------------------------------------------------------------

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        stream, splitter = self.splitters[fd]
        if not data:
            self._close_pipe(fd)
        elif self.writer.full:  # past the budget: count the rest, keep its tail
            self._overflow(stream, splitter).feed(data)
            if stream == "o":
                self._last_report(data)
        else:
            self._add(fd, stream, splitter.feed(data))

    def _add(self, fd: int, stream: Stream, chunks: list[Chunk]) -> None:
        """Output lines to the writer; progress lines (whole stdout lines) to its progress."""
        if not chunks:
            return
        if stream == "o" and any(text.startswith(DIRECTIVE) for text, _ in chunks):
            chunks = self._take_reports(fd, chunks)
        else:
            self.midline[fd] = chunks[-1][1]
        self.writer.add_chunks(stream, chunks)

    def _take_reports(self, fd: int, chunks: list[Chunk]) -> list[Chunk]:
        """Hand each report to the writer after the lines before it (so they stay in
        order); returns the lines after the last report."""
        out: list[Chunk] = []
        mid = self.midline.get(fd, False)
        for text, continued in chunks:
            report = None
            if not mid and not continued and text.startswith(PROGRESS_DIRECTIVE):
                report = parse_progress_line(text)
            if report is not None:
                self.writer.add_chunks("o", out)
                out = []
                self.writer.progress(report)
            else:
                out.append((text, continued))
            mid = continued
        self.midline[fd] = mid
        return out

    def _last_report(self, data: bytes) -> None:
        """Past the budget: the last whole `::tidal progress` line of this read, if any."""
        end = len(data)
        while (at := data.rfind(_PROGRESS_BYTES, 0, end)) >= 0:
            stop = data.find(b"\n", at)
            if (at == 0 or data[at - 1] == 0x0A) and stop >= 0:
                report = parse_progress_line(decode(data[at:stop]).removesuffix("\r"))
                if report is not None:
                    self.writer.progress(report)
                    return
            end = at

    def _overflow(self, stream: Stream, splitter: LineSplitter) -> Overflow:
        if stream not in self.overflows:
            self.overflows[stream] = Overflow(self.limits.tail_bytes)
            self.overflows[stream].feed(splitter.take_partial())
        return self.overflows[stream]

    def _close_pipe(self, fd: int) -> None:
        stream, splitter = self.splitters.pop(fd)
        self.sel.unregister(fd)
        if self.writer.full:
            self._overflow(stream, splitter)
        else:
            self._add(fd, stream, splitter.close())

    def _mark_exited(self) -> None:
        self.exited = True
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def _drain_wake(self) -> None:
        try:
            os.read(self.wake, 64)
        except OSError:
            pass

    def _terminate(self, reason: str) -> None:
        self.kill_reason = reason
        self.writer.add("x", _STOP_NOTE.get(reason, reason).format(timeout=self.timeout_s))
        self.tree = pg.descendants(self.proc.pid)
        pg.signal_group(self.pgid, signal.SIGTERM)
        pg.kill_all(self.tree, signal.SIGTERM)
        self.kill_at = monotonic() + self.kill_grace_s

    def _kill(self) -> None:
        self.killed = True
        self.tree += pg.descendants(self.proc.pid)
        pg.signal_group(self.pgid, signal.SIGKILL)
        pg.kill_all(self.tree, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    # -- the end -----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Take what the pipes still hold, kill what is left of the group (the leader is
        not reaped yet, so its pid cannot have been reused), reap, close everything."""
        for fd in list(self.splitters):
            for _ in range(16):
                if fd not in self.splitters:
                    break
                self._read(fd)
            if fd in self.splitters:
                self._close_pipe(fd)
        pg.signal_group(self.pgid, signal.SIGKILL)
        pg.kill_all(self.tree, signal.SIGKILL)
        if self.cgroup is not None:
            self.limit_hits = self.cgroup.limit_hits()
            self.cgroup.kill()
        self._write_overflows()
        if self.limit_hits:
            self.writer.add("x", self._pids_error(), budget=False)
        self._reap()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.sel.close()
        self.run.close_wake()

    def _reap(self) -> None:
        """Reap the leader with wait4, for its rusage (the leader's CPU and max RSS, and
        those of every descendant reaped below it); without a pidfd to wait on, or when it
        does not end within REAP_S, Popen.wait does it (and the rusage is not known)."""
        pid = self.proc.pid
        if not self.exited and self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], REAP_S)
            self.exited = bool(readable)
        elif not self.exited:
            self.exited = pg.has_exited(pid)
        if self.exited and self.proc.returncode is None:
            try:
                _, status, self.rusage = os.wait4(pid, 0)
                self.proc.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere
                pass
        try:
            self.proc.wait(timeout=REAP_S)
        except subprocess.TimeoutExpired:
            pass

    def _write_overflows(self) -> None:
        tails = []
        for stream, overflow in self.overflows.items():
            nbytes, lines, chunks = overflow.finish(self.limits.line_max_bytes)
            self.writer.overflowed(nbytes, lines)
            tails.append((stream, chunks))
        for stream, chunks in tails:
            self.writer.add_tail(stream, chunks)

    def _pids_error(self) -> str:
        limit = self.cgroup.pids_max if self.cgroup is not None else 0
        return (f"the job tried to run more than {limit} processes at once "
                f"({self.limit_hits} forks refused at pids.max)")

    def outcome(self) -> Outcome:
        """How the attempt ended, with what its process tree used."""
        return replace(self._outcome(), usage=self.usage.fields(self.rusage))

    def _outcome(self) -> Outcome:
        if self.kill_reason is not None and self.kill_reason != "timeout":
            return abort_outcome(self.kill_reason)
        if self.limit_hits:
            return Outcome("failed", None, error=self._pids_error(), reason="pids_limit")
        if self.kill_reason == "timeout":
            return Outcome(
                "failed", None, error=f"timed out after {self.timeout_s:g}s", reason="timeout"
            )
        code = self.proc.returncode
        if code is None:
            return Outcome("failed", None, error="the process did not end", reason="signal")
        if code == 0:
            return Outcome("completed", 0)
        if code > 0:
            return Outcome("failed", code, error=f"exited with {code}", reason="exit_code")
        return Outcome(
            "failed", 128 - code, error=f"killed by {pg.signal_name(-code)}", reason="signal"
        )
