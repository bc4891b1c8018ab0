"""The worker: reads as many dispatch entries as it has free slots, runs them, reports.

Threads (STYLE.md item 8):
- the consumer (the thread that calls `run()`): XREADGROUP for free slots only, then ONE
  start.lua call per queue for the whole batch, then hands each job to the runner pool;
  after a failed read it also reads its own pending entries (`_recover_pending`), so the
  entries of a reply lost on the way do not wait there until the worker stops;
- up to `slots` runner threads, fed from one ready queue: execute a job, flush its log,
  queue its outcome for the finisher. A batch wakes one runner per job, except that the
  python jobs (thread mode) of a function whose last run took under QUICK_S are run one
  after the other by ONE runner: waking a thread costs more than such a job. Should one
  of them take long after all, the consumer sees jobs waiting in the ready queue for
  over STALL_S and wakes more runners (`_unstall`), so no job waits behind another for
  longer than that;
- the finisher thread: finish.lua for every queued outcome in ONE pipelined round trip
  (group commit: what finished while the last batch was on the wire goes in the next), then
  frees those slots;
- the heartbeat thread: heartbeat.lua every `heartbeat_s` (worker hash + TTL, registry
  zset), and cancels running jobs whose cancel flag it sees (pub/sub fallback);
- the control thread: SUBSCRIBE to the worker's control channel (`cancel <job id>`);
- the log flusher thread: time-based flushes of python jobs' logs.

Stop (SIGTERM): the consumer stops reading; running jobs get `shutdown_grace_s` to end.
The rest are HANDED BACK at once: their process trees are killed first, then reclaim.lua
requeues each with its place in the queue (fenced by the token; it spends no retry and,
unlike a lost attempt, does not count towards `max_deliveries`), so another worker runs
them now, not after this worker's lease. Entries read but never started, and anything else still
pending under this worker's name, are handed back the same way; then the worker deletes
its consumer (only with an empty pending list) and its heartbeat, and exits 0. A python
job running in a thread cannot be stopped: it is handed back and dies with the process.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import cached_property
from typing import Any

import psutil
import redis
from structlog.contextvars import bound_contextvars

from common import scripts as sc
from common.backoff import retry_delay_s
from common.clock import monotonic, now_ms
from common.keys import GROUP_WORKERS, Keys
from common.logging import get_logger
from common.models import JobSubmission
from common.redis import connect
from common.settings import Settings
from common.streams import ensure_group
from worker.cgroup import Cgroups
from worker.job import CANCELLED, LOST, SHUTDOWN, JobRun, parse_spec
from worker.options import WorkerOptions
from worker.output import Flusher, LogWriter
from worker.python import BUILTIN_MODULE, LazyLog, run_python, run_python_isolated
from worker.shell import DRAIN_S, Limits, job_env, run_process

VERSION = "0.1.0"
FINISH_TRIES_WHEN_STOPPING = 5
QUICK_S = 0.002  # a python function whose last run took less is run in batches …
STALL_S = 0.005  # … and a job that waited this long in the ready queue gets its own runner
RECOVER_COUNT = 10_000  # pending entries looked at after a failed read

log = get_logger("tidal.worker")

Entry = tuple[str, str, str]  # (queue, dispatch entry id, job id)
_NO_SPEC = JobSubmission(command=["true"])  # for entries handed back without being read


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        client: redis.Redis | None = None,
        block_ms: int = 1000,
        options: WorkerOptions | None = None,
    ) -> None:
        self.settings = settings
        self.options = options if options is not None else WorkerOptions()
        self.keys = Keys(settings.prefix)
        self._own_client = client is None
        self.client: redis.Redis = client if client is not None else connect(settings.redis_url)
        self.scripts = sc.Scripts(self.client)
        self.id = new_worker_id()
        self.queues = list(dict.fromkeys(settings.queues))
        self.slots = max(1, settings.concurrency)
        self.allowed = (*settings.allow_modules, BUILTIN_MODULE)
        self.grace_s = settings.shutdown_grace_s
        self.block_ms = block_ms
        self.started_at = now_ms()
        self.hostname = socket.gethostname()
        self._stop = threading.Event()  # stop reading
        self._halt = threading.Event()  # stop the helper threads (after the jobs)
        self._force = threading.Event()  # a second signal: no more grace
        self._subscribed = threading.Event()
        self._slots = threading.Condition()
        self._running: dict[str, JobRun] = {}
        self._backlog: deque[Entry] = deque()
        self._unsure: set[str] = set()  # entries whose start call failed midway
        self._recover = False  # a read or start failed: look at our own pending entries
        self._candidates: dict[str, list[str]] = {}  # queue → its head at the last read
        self._ready: deque[tuple[JobRun, float]] = deque()  # (run, monotonic time queued)
        self._ready_cond = threading.Condition(threading.Lock())
        self._idle_runners = 0  # runners waiting for work that no notify has woken yet
        self._runners: list[threading.Thread] = []
        self._quick: dict[str, bool] = {}  # python function → its last run was quick
        self._flusher = Flusher()
        self.cgroups: Cgroups | None = None
        self._confirm_lock = threading.Lock()
        self._finishing = threading.Condition()
        self._to_finish: list[tuple[JobRun, sc.Outcome, sc.Call]] = []
        self._finisher_idle = False  # the finisher waits for outcomes (needs a notify)
        self._log_finished = True  # "job finished" lines are logged (INFO enabled)
        self.abandoned = 0  # python jobs still executing when run() returned
        self.handed_back = 0  # jobs requeued at shutdown

    # -- public ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`; returns when every job has been finished or handed back."""
        with bound_contextvars(worker_id=self.id):
            self._log_finished = log.is_enabled_for(logging.INFO)
            log.info("worker starting", queues=self.queues, slots=self.slots,
                     python_isolation=self.options.python_isolation)
            helpers: list[threading.Thread] = []
            try:
                self.cgroups = Cgroups.create(self.id, self.options.job_pids_max,
                                              self.options.job_cgroup_root)
                if not self._start_up():
                    return
                helpers = [
                    self._thread(self._heartbeat_loop, "tidal-heartbeat"),
                    self._thread(self._control_loop, "tidal-control"),
                    self._thread(self._flusher.run, "tidal-log-flusher"),
                    self._thread(self._finish_loop, "tidal-finisher"),
                ]
                self._subscribed.wait(5.0)
                self._consume()
                self._drain()
            finally:
                self._close(helpers)
            log.info("worker stopped")

    def stop(self, *, force: bool = False) -> None:
        """Stop reading and wind down (thread-safe; `force` skips the grace period)."""
        self._stop.set()
        if force:
            self._force.set()
        with self._slots:
            self._slots.notify_all()

    @cached_property
    def resources(self) -> dict[str, str | int]:
        """What this worker offers the scheduler's resource ledger (settings, else detected)."""
        s = self.settings
        cpu = s.worker_cpu if s.worker_cpu is not None else float(os.cpu_count() or 1)
        mem = s.worker_memory_mb
        if mem is None:
            mem = psutil.virtual_memory().total // (1024 * 1024)
        return {"cpu": str(cpu), "memory_mb": int(mem), "gpu": s.worker_gpu}

    def running_ids(self) -> list[str]:
        with self._slots:
            return list(self._running)

    # -- start-up and shutdown ---------------------------------------------------------

    def _start_up(self) -> bool:
        """Consumer groups for every queue and a first heartbeat; waits for Redis."""
        failures = 0
        while not self._stop.is_set():
            try:
                for queue in self.queues:
                    ensure_group(self.client, self.keys.dispatch(queue), GROUP_WORKERS)
                self._beat()
                return True
            except redis.RedisError as exc:
                failures += 1
                log.warning("redis unavailable at start-up", error=str(exc), tries=failures)
                self._stop.wait(retry_delay_s(failures, 0.2, 2.0, 5.0))
        return False

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        ctx = contextvars.copy_context()
        thread = threading.Thread(target=ctx.run, args=(target,), name=name, daemon=True)
        thread.start()
        return thread

    def _drain(self) -> None:
        """Give running jobs the grace period, then hand back the rest (see the module
        docstring): stop them, wait for their runners to kill the process trees and hand
        them back; python jobs in threads cannot be stopped, so they are handed back from
        here and die with the process."""
        with self._ready_cond:  # the consumer no longer watches the ready queue
            self._wake_runners(len(self._ready))
        self._wait_idle(self.grace_s)
        with self._slots:
            left = list(self._running.values())
        if not left:
            return
        log.warning("grace period over: handing jobs back", jobs=[run.job_id for run in left])
        threads = {run for run in left if self._in_thread(run)}
        for run in left:
            run.abort(SHUTDOWN)
        self._wait_idle(self.settings.kill_grace_s + DRAIN_S + 2.0, force_ok=False,
                        keep=threads)
        for run in threads:
            with self._slots:
                still_running = self._running.get(run.job_id) is run
            if run.claim_finish():
                self._hand_back([run])
            if still_running:
                self._release(run)
                self.abandoned += 1

    def _wait_idle(
        self, timeout_s: float, force_ok: bool = True, keep: set[JobRun] | frozenset[JobRun]
        = frozenset()
    ) -> None:
        """Wait until no job but those in `keep` runs (or the timeout, or a second signal)."""
        deadline = monotonic() + timeout_s
        with self._slots:
            while set(self._running.values()) - keep and not (
                force_ok and self._force.is_set()
            ):
                left = deadline - monotonic()
                if left <= 0:
                    return
                self._slots.wait(min(left, 0.5))

    def _close(self, helpers: list[threading.Thread]) -> None:
        self._stop.set()
        self._halt.set()
        with self._finishing:
            self._finishing.notify_all()
        self._flusher.stop()
        for thread in helpers:
            thread.join(timeout=5.0)
        with self._ready_cond:  # idle runners leave; one stuck in a job dies with the process
            self._ready.clear()
            self._ready_cond.notify_all()
        if helpers:  # it had started: leave nothing behind in Redis
            self._leave()
        if self.cgroups is not None:
            self.cgroups.close()
        if self._own_client:
            self.client.close()

    # -- consumer ----------------------------------------------------------------------

    def _consume(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._unstall()
            free = self._wait_for_slot()
            if free <= 0:
                continue
            try:
                if self._recover:
                    self._recover_pending()
                    self._recover = False
                if not self._backlog:
                    self._read(free)
                self._start(free)
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                self._recover = True
                log.warning("reading jobs failed", error=str(exc), tries=failures)
                if "NOGROUP" in str(exc):
                    self._ensure_groups()
                self._stop.wait(retry_delay_s(failures, 0.1, 2.0, 5.0))

    def _wait_for_slot(self) -> int:
        """Free slots, once there are some; 0 (to look at the ready queue first) after
        STALL_S while jobs wait there."""
        with self._slots:
            while not self._stop.is_set() and len(self._running) >= self.slots:
                if self._ready:
                    if not self._slots.wait(STALL_S):
                        return 0
                else:
                    self._slots.wait()
            return 0 if self._stop.is_set() else self.slots - len(self._running)

    def _ensure_groups(self) -> None:
        try:
            for queue in self.queues:
                ensure_group(self.client, self.keys.dispatch(queue), GROUP_WORKERS)
        except redis.RedisError as exc:
            log.warning("cannot create consumer groups", error=str(exc))

    def _read(self, count: int) -> None:
        """XREADGROUP up to `count` entries per queue into the backlog (with several
        queues a read may bring more than `count`; the rest waits for free slots)."""
        streams: dict[Any, Any] = {self.keys.dispatch(q): ">" for q in self.queues}
        queue_of = {self.keys.dispatch(q): q for q in self.queues}
        # while jobs wait for a runner, come back soon to see that they got one
        block = min(self.block_ms, int(STALL_S * 1000)) if self._ready else self.block_ms
        if self.settings.worker_dispatch:
            reply = self._dispatch_and_read(streams, count, block)
        else:
            reply = self.client.xreadgroup(GROUP_WORKERS, self.id, streams, count=count,
                                           block=block)
        for stream, items in _stream_items(reply):
            for entry_id, fields in items:
                job_id = (fields or {}).get("id")
                if job_id:
                    self._backlog.append((queue_of[stream], entry_id, job_id))
                else:
                    self._drop_malformed(stream, entry_id, fields)

    def _recover_pending(self) -> None:
        """After a failed read or start: the entries pending under this worker's name that
        it never saw go to the backlog. A read whose reply was lost on the way (a reset
        connection, a timeout) left its entries in this consumer's pending list, where
        nothing else looks while the worker lives: `>` gives only new entries, and the
        reaper takes only a dead worker's. XREADGROUP with id 0 gives the consumer's own
        pending entries, in full; those it runs or holds in the backlog are left alone
        (start.lua would skip a running job's entry and acknowledge it), entries deleted
        meanwhile come without fields and are acknowledged. Only the consumer thread
        starts jobs, so none starts between the read and the look at what runs."""
        streams: dict[Any, Any] = {self.keys.dispatch(q): "0" for q in self.queues}
        queue_of = {self.keys.dispatch(q): q for q in self.queues}
        reply = self.client.xreadgroup(GROUP_WORKERS, self.id, streams, count=RECOVER_COUNT)
        with self._slots:
            known = {run.token for run in self._running.values()}
        known.update(entry_id for _, entry_id, _ in self._backlog)
        found: list[Entry] = []
        for stream, items in _stream_items(reply):
            for entry_id, fields in items:
                if entry_id in known:
                    continue
                job_id = (fields or {}).get("id")
                if job_id:
                    found.append((queue_of[stream], entry_id, job_id))
                elif not fields:
                    self.client.xack(stream, GROUP_WORKERS, entry_id)
                else:
                    self._drop_malformed(stream, entry_id, fields)
        if found:
            log.warning("entries of a lost read recovered", entries=len(found))
            self._backlog.extendleft(reversed(found))

    def _dispatch_and_read(self, streams: dict[Any, Any], count: int, block: int) -> Any:
        """The read of `_read` with the worker's own dispatch in front, in ONE round trip:
        per queue, dispatch.lua for the jobs at its head that the last read saw (the
        capacity the scheduler published bounds it, so the stream never holds more than
        the live free slots; see dispatch.lua), and ZRANGE of its head for the next time;
        then the XREADGROUP, which finds what was just dispatched. A freed slot is so
        refilled without waiting for the scheduler's wake-up and round trips. A failed
        dispatch costs nothing but itself: the scheduler dispatches those jobs."""
        window = min(max(count * 2, 16), self.settings.dispatch_batch)
        maxlen = self.settings.events_maxlen

        def build(batch: sc.Batch) -> None:
            for queue in self.queues:
                if candidates := self._candidates.get(queue):
                    batch.script(sc.dispatch(self.keys, queue, candidates, capacity=None,
                                             events_maxlen=maxlen, by=self.id))
                batch.zrange(self.keys.queue(queue), 0, window - 1)
            batch.xreadgroup(GROUP_WORKERS, self.id, streams, count=count, block=block)

        got = self.scripts.execute(build, raise_errors=False)
        reply = got.pop()
        for queue in self.queues:
            if self._candidates.get(queue):
                sent = got.pop(0)
                if isinstance(sent, Exception):
                    log.warning("dispatch failed", queue=queue, error=str(sent))
            head = got.pop(0)
            self._candidates[queue] = [] if isinstance(head, Exception) else list(head)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _drop_malformed(self, stream: str, entry_id: str, fields: Any) -> None:
        log.error("malformed dispatch entry dropped", stream=stream, entry=entry_id, fields=fields)
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(stream, GROUP_WORKERS, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()

    def _start(self, free: int) -> None:
        """ONE start.lua call per queue for up to `free` backlog entries. When a call
        fails, its entries go back to the backlog marked unsure: the reply may have been
        lost after the script ran, and start.lua must not see an entry twice (it would
        take a job it started for a stale entry and drop it)."""
        batch = [self._backlog.popleft() for _ in range(min(free, len(self._backlog)))]
        done: set[str] = set()
        try:
            batch = self._settle(batch)
            for queue, entries in _by_queue(batch).items():
                call = sc.start(self.keys, queue, entries, worker=self.id,
                                events_maxlen=self.settings.events_maxlen)
                sent_at = monotonic()
                rows = self.scripts.run(call)
                runs: list[JobRun] = []
                for (entry_id, _), row in zip(entries, rows, strict=True):
                    done.add(entry_id)
                    run = self._launch(queue, entry_id, row, sent_at)
                    if run is not None:
                        runs.append(run)
                self._hand_out(runs)
        except redis.RedisError:
            left = [item for item in batch if item[1] not in done]
            self._unsure.update(entry_id for _, entry_id, _ in left)
            self._backlog.extendleft(reversed(left))
            raise

    def _settle(self, batch: list[Entry]) -> list[Entry]:
        """Launch the unsure entries that an earlier start call did start (the job hash
        names this worker and the entry); return the entries still to start."""
        unsure = [item for item in batch if item[1] in self._unsure]
        if not unsure:
            return batch
        pipe = self.client.pipeline(transaction=False)
        for _, _, job_id in unsure:
            pipe.hmget(self.keys.job(job_id), "state", "dispatch_id", "worker", "attempt", "spec",
                       "owner")
        started = set()
        runs: list[JobRun] = []
        for (queue, entry_id, job_id), h in zip(unsure, pipe.execute(), strict=True):
            if h[0] == "running" and h[1] == entry_id and h[2] == self.id:
                started.add(entry_id)
                run = self._launch(queue, entry_id, [job_id, int(h[3]), h[4], -1, h[5] or ""])
                if run is not None:
                    runs.append(run)
        self._hand_out(runs)
        self._unsure.difference_update(entry_id for _, entry_id, _ in unsure)
        return [item for item in batch if item[1] not in started]

    def _launch(self, queue: str, entry_id: str, row: list[Any],
                sent_at: float = float("-inf")) -> JobRun | None:
        """The run of a job start.lua started, for `_hand_out` (None: nothing to run).
        The row's 4th value is what was left of this worker's lease when start.lua ran
        (sent at `sent_at`): the job is ours at least until then, which counts as a
        heartbeat that confirmed it (`_still_ours`), so a job starts without a heartbeat
        of its own. A spec that does not parse fails the job at once."""
        job_id, attempt, spec_json = str(row[0]), int(row[1]), row[2]
        if attempt == 0:
            log.debug("dispatch entry skipped", job_id=job_id, entry=entry_id)
            return None
        try:
            spec = parse_spec(spec_json)
        except ValueError as exc:
            log.error("job spec unreadable", job_id=job_id, error=str(exc))
            bad = JobRun(job_id, queue, entry_id, attempt, _NO_SPEC)
            with self._slots:  # the finisher frees the slot: take it first
                self._take_slot(bad)
            error = f"invalid spec: {exc}"
            if not self._finish(bad, sc.Outcome("failed", None, error=error,
                                                reason="invalid_spec")):
                self._release(bad)
            return None
        run = JobRun(job_id, queue, entry_id, attempt, spec, str(row[4]) if len(row) > 4 else "")
        lease_ms = int(row[3]) if len(row) > 3 else -1
        if lease_ms > 0:  # as if a heartbeat had renewed the lease at its expiry − TTL
            run.confirmed_at = sent_at + lease_ms / 1000 - self.settings.worker_ttl_s
        return run

    def _take_slot(self, run: JobRun) -> None:
        """Count `run` as running (the caller holds `_slots`). A run of the same job still
        here was reclaimed while this worker was away (frozen past its TTL), since
        start.lua just gave the job a new attempt: that copy is stopped."""
        stale = self._running.get(run.job_id)
        self._running[run.job_id] = run
        if stale is not None and stale.abort(LOST):
            log.warning("a newer attempt replaces a stale one", job_id=run.job_id,
                        stale=stale.attempt, attempt=run.attempt)

    def _hand_out(self, runs: list[JobRun]) -> None:
        """Count a batch of runs as running and queue them for the runners: a runner
        woken per job, but one for all the quick python jobs of the batch."""
        if not runs:
            return
        with self._slots:
            for run in runs:
                self._take_slot(run)
        quick = sum(1 for run in runs if self._is_quick(run))
        with self._ready_cond:
            now = monotonic()
            self._ready.extend((run, now) for run in runs)
            self._wake_runners(len(runs) - quick + (1 if quick else 0))

    def _is_quick(self, run: JobRun) -> bool:
        return self._quick.get(run.spec.function or "", False) and self._in_thread(run)

    def _wake_runners(self, wanted: int) -> None:
        """Wake up to `wanted` idle runners, starting new ones (up to `slots`) when too
        few are idle. The caller holds `_ready_cond`."""
        wake = min(wanted, self._idle_runners)
        if wake > 0:
            self._idle_runners -= wake
            self._ready_cond.notify(wake)
        new = min(wanted - wake, self.slots - len(self._runners))
        for _ in range(max(0, new)):
            name = f"tidal-run_{len(self._runners)}"
            self._runners.append(self._thread(self._runner_loop, name))

    def _unstall(self) -> None:
        """Wake a runner for every job that waited in the ready queue for over STALL_S
        (a quick function's run that took long holds up the batch behind it), and stop
        counting as quick the functions whose runs go on past QUICK_S."""
        if not self._ready:
            return
        now = monotonic()
        with self._ready_cond:
            stalled = sum(1 for _, at in self._ready if now - at >= STALL_S)
            if stalled:
                self._wake_runners(stalled)
        if stalled:
            with self._slots:
                runs = list(self._running.values())
            for run in runs:
                if run.began_at is not None and now - run.began_at >= QUICK_S \
                        and self._in_thread(run):
                    self._quick[run.spec.function or ""] = False

    # -- runner threads ----------------------------------------------------------------

    def _runner_loop(self) -> None:
        """Run jobs from the ready queue until the worker halts."""
        while True:
            with self._ready_cond:
                while not self._ready:
                    if self._halt.is_set():
                        return
                    self._idle_runners += 1
                    self._ready_cond.wait()
                run, _ = self._ready.popleft()
            # each job in a context of its own, so what one sets is not seen by the next
            contextvars.copy_context().run(self._run_job, run)

    def _run_job(self, run: JobRun) -> None:
        if self._in_thread(run):
            self._run_in_thread(run)
            return
        queued = False  # once the finisher has the outcome, it frees the slot
        with bound_contextvars(job_id=run.job_id, attempt=run.attempt):
            try:
                writer = self._writer(run)
                outcome = self._execute(run, writer)
                writer.close()
                queued = self._finish(run, outcome)
            except Exception as exc:  # a bug of the worker, not of the job
                log.exception("job runner failed")
                queued = self._fail_worker_error(run, exc)
            finally:
                if not queued:
                    self._release(run)

    def _run_in_thread(self, run: JobRun) -> None:
        """A python job in this runner thread: no per-job log context (log calls name the
        job), and a LogWriter only if the job writes to its log."""
        queued = False
        lazy = LazyLog(lambda: self._writer(run, flusher=True))
        try:
            try:
                outcome = self._execute_in_thread(run, lazy)
            finally:
                if lazy.writer is not None:
                    self._flusher.remove(lazy.writer)
            lazy.close()
            queued = self._finish(run, outcome)
        except Exception as exc:  # a bug of the worker, not of the job
            log.exception("job runner failed", job_id=run.job_id, attempt=run.attempt)
            queued = self._fail_worker_error(run, exc)
        finally:
            if not queued:
                self._release(run)

    def _fail_worker_error(self, run: JobRun, exc: Exception) -> bool:
        """Fail a job whose runner hit a bug of the worker; True if its outcome is queued."""
        return self._finish(run, sc.Outcome("failed", None, error=f"worker error: {exc!r}",
                                            reason="worker_error"))

    def _writer(self, run: JobRun, *, flusher: bool = False) -> LogWriter:
        """The job's LogWriter; with `flusher`, flushed on time by the flusher thread (a
        python job's function cannot do it)."""
        writer = LogWriter(
            self.client, self.keys, run.job_id,
            flush_ms=self.settings.log_flush_ms, max_lines=self.settings.log_max_lines,
            max_bytes=self.options.log_max_bytes,
            events_maxlen=self.settings.events_maxlen, scripts=self.scripts,
        )
        if flusher:
            self._flusher.add(writer)
        return writer

    def _in_thread(self, run: JobRun) -> bool:
        return run.kind == "python" and self.options.python_isolation == "thread"

    def _still_ours(self, run: JobRun) -> bool:
        """Asked right before a job's process (or thread job) starts: True only while a
        heartbeat sent less than half a TTL ago found the attempt still ours (or start.lua
        found the lease that long: `_launch`), so its lease surely holds. A worker frozen
        (SIGSTOP, a VM pause) or cut off after start.lua may have lost the attempt to the
        reaper meanwhile; it then beats first and learns so, instead of starting a process
        another attempt may already run. One beat (under a lock) confirms every job
        launched so far. While Redis does not answer, the job
        waits (at shutdown it is handed back). A freeze between this check and the fork
        is the window no lease can close (docs/reliability.md)."""
        half_ttl = self.settings.worker_ttl_s / 2
        failures = 0
        with self._confirm_lock:
            while run.abort_reason is None and monotonic() - run.confirmed_at >= half_ttl:
                try:
                    self._beat()
                except redis.RedisError as exc:
                    if self._stop.is_set():
                        run.abort(SHUTDOWN)
                        break
                    failures += 1
                    log.warning("lease not confirmed yet: job waits", error=str(exc),
                                tries=failures)
                    time.sleep(retry_delay_s(failures, 0.1, 2.0, 5.0))
        return run.abort_reason is None

    def _execute_in_thread(self, run: JobRun, lazy: LazyLog) -> sc.Outcome:
        """Call a python job's function here, and note whether it was quick."""
        s = self.settings
        timeout_s = run.spec.timeout or s.default_timeout_s
        if not self._still_ours(run):
            return sc.Outcome("failed", None, error="not started: the attempt is no "
                              "longer this worker's", reason=LOST)
        run.began_at = began = monotonic()
        outcome = run_python(run, lazy, allowed=self.allowed, timeout_s=timeout_s,
                             line_max_bytes=s.log_line_max_bytes)
        self._quick[run.spec.function or ""] = monotonic() - began < QUICK_S
        return outcome

    def _execute(self, run: JobRun, writer: LogWriter) -> sc.Outcome:
        """A shell job, or a python job in a child interpreter."""
        s = self.settings
        timeout_s = run.spec.timeout or s.default_timeout_s
        log.debug("job started", kind=run.kind, queue=run.queue)
        cgroup = self.cgroups.job(f"{run.job_id}-{run.attempt}") if self.cgroups else None
        limits = Limits(timeout_s, s.kill_grace_s, s.log_line_max_bytes,
                        self.options.log_tail_bytes, cgroup, lambda: self._still_ours(run))
        run.began_at = monotonic()
        try:
            if run.kind == "python":
                return run_python_isolated(run, writer, allowed=self.allowed, limits=limits)
            done = run_process(run, writer, run.spec.argv(), job_env(run), limits)
            return done if isinstance(done, sc.Outcome) else done.outcome()
        finally:
            if cgroup is not None:
                cgroup.remove()

    def _release(self, run: JobRun) -> None:
        self._release_all([run])

    def _release_all(self, runs: list[JobRun]) -> None:
        """Free the slots of these runs, with one wake-up of whoever waits for a slot."""
        with self._slots:
            for run in runs:
                if self._running.get(run.job_id) is run:
                    del self._running[run.job_id]
            self._slots.notify_all()

    def _finish(self, run: JobRun, outcome: sc.Outcome) -> bool:
        """Queue the outcome for the finisher; True when queued (the finisher then frees
        the slot). A run lost to another attempt is not finished; one stopped by the
        shutdown is handed back instead."""
        if not run.claim_finish():
            return False
        if run.abort_reason == LOST:
            log.warning("job lost to another attempt while this worker was away; not finished",
                        job_id=run.job_id, attempt=run.attempt)
            return False
        if run.abort_reason == SHUTDOWN:
            self._hand_back([run])
            return False
        delay = 0.0  # finish.lua only uses it to retry a failure
        if outcome.state == "failed":
            spec = run.spec
            delay = retry_delay_s(run.attempt, spec.retry_delay, spec.retry_backoff,
                                  spec.retry_max_delay)
        call = sc.finish(
            self.keys, run.job_id, run.queue, run.token, outcome, worker=self.id,
            retry_delay_ms=int(delay * 1000), events_maxlen=self.settings.events_maxlen,
            ttl_s=self.settings.job_ttl_s,
            # a worker that refills its own slots settles plain jobs itself (finish.lua):
            # the scheduler need not wake for them
            owner=run.owner if self.settings.worker_dispatch else "",
        )
        with self._finishing:
            self._to_finish.append((run, outcome, call))
            if self._finisher_idle:  # else it takes this batch on its next round
                self._finishing.notify()
        return True

    def _finish_loop(self) -> None:
        """The finisher: everything queued goes out in one pipeline of finish.lua calls.
        It runs until the worker halts and nothing is left to finish."""
        while True:
            with self._finishing:
                while not self._to_finish and not self._halt.is_set():
                    self._finisher_idle = True
                    self._finishing.wait(0.5)
                    self._finisher_idle = False
                batch, self._to_finish = self._to_finish, []
            if not batch:
                return
            self._finish_batch(batch)

    def _finish_batch(self, batch: list[tuple[JobRun, sc.Outcome, sc.Call]]) -> None:
        """Redis errors are retried (the token makes finish.lua idempotent: after a lost
        reply the retry answers -1, which then means done)."""
        tries = 0
        while True:
            tries += 1
            try:
                results = self._finish_calls([call for _, _, call in batch])
                break
            except redis.RedisError as exc:
                if self._stop.is_set() and tries >= FINISH_TRIES_WHEN_STOPPING:
                    log.error("cannot finish jobs: left for the reaper", error=str(exc),
                              jobs=[run.job_id for run, _, _ in batch])
                    results = [exc] * len(batch)
                    break
                log.warning("finish failed, retrying", error=str(exc), tries=tries,
                            jobs=len(batch))
                time.sleep(retry_delay_s(tries, 0.1, 2.0, 5.0))
        for (run, outcome, _), result in zip(batch, results, strict=True):
            self._report(run, outcome, result, tries)
        self._release_all([run for run, _, _ in batch])

    def _finish_calls(self, calls: list[sc.Call]) -> list[Any]:
        """Every outcome in ONE finish.lua call (batch mode). Should the script fail midway
        (a damaged key: scripts don't roll back), each job is finished again by its own
        call, so one bad job costs the others nothing: the token fences them, and those
        the batch did finish answer -1 (done by the earlier try)."""
        if len(calls) > 1:
            try:
                return list(self.scripts.run(sc.finish_batch(calls)))
            except redis.ResponseError as exc:  # not a connection error: those are retried
                log.warning("batch finish failed; finishing one by one", error=str(exc),
                            jobs=len(calls))
        return self.scripts.run_many(calls, raise_errors=False)

    def _report(self, run: JobRun, outcome: sc.Outcome, result: Any, tries: int) -> None:
        job = {"job_id": run.job_id, "attempt": run.attempt}
        if isinstance(result, Exception):
            log.error("finish failed: left for the reaper", error=str(result), **job)
        elif isinstance(result, str):
            if self._log_finished:
                log.info("job finished", state=result, reason=outcome.reason or None,
                         exit_code=outcome.exit_code, **job)
        elif result == -1 and tries > 1:
            log.info("job finished (by the earlier try)", state=outcome.state, **job)
        elif result == -1:
            log.warning("stale attempt: another attempt owns the job; outcome dropped",
                        state=outcome.state, **job)
        else:
            log.warning("finish refused", code=result, state=outcome.state, **job)

    # -- handing back at shutdown --------------------------------------------------------

    def _hand_back(self, runs: list[JobRun]) -> None:
        """Requeue attempts this worker gives up, at once: reclaim.lua, fenced by each
        token (a job another attempt owns by now is left alone)."""
        by_queue: dict[str, list[tuple[str, str]]] = {}
        for run in runs:
            by_queue.setdefault(run.queue, []).append((run.token, run.job_id))
        for queue, entries in by_queue.items():
            call = sc.reclaim(
                self.keys, queue, entries, max_deliveries=self.settings.max_deliveries,
                events_maxlen=self.settings.events_maxlen, ttl_s=self.settings.job_ttl_s,
                by=self.id, handed_back=True,
            )
            if self._call_while_stopping(call, "hand back jobs") is not None:
                self.handed_back += len(entries)
                log.info("jobs handed back", queue=queue, jobs=[j for _, j in entries])

    def _call_while_stopping(self, call: sc.Call, what: str) -> Any:
        """Run a script a few times on Redis errors; None when Redis stays away (what
        was not done is then left for the reaper, once this worker's heartbeat expires)."""
        for tries in range(1, FINISH_TRIES_WHEN_STOPPING + 1):
            try:
                return self.scripts.run(call)
            except redis.RedisError as exc:
                if tries == FINISH_TRIES_WHEN_STOPPING:
                    log.error(f"cannot {what}: left for the reaper", error=str(exc))
                    return None
                time.sleep(retry_delay_s(tries, 0.1, 2.0, 2.0))
        return None

    def _leave(self) -> None:
        """Hand back whatever is still pending under this worker's name (entries read but
        not started, replies lost on the way), then remove its consumer and heartbeat."""
        try:
            for queue in self.queues:
                stream = self.keys.dispatch(queue)
                pending = self.client.xpending_range(
                    stream, GROUP_WORKERS, min="-", max="+", count=10_000, consumername=self.id)
                ids = [p["message_id"] for p in pending]
                entries = [(eid, f["id"]) for i in ids for eid, f in self.client.xrange(
                    stream, i, i) if f and "id" in f]
                runs = [JobRun(job_id, queue, eid, 0, _NO_SPEC) for eid, job_id in entries]
                if runs:
                    self._hand_back(runs)
                gone = set(ids) - {eid for eid, _ in entries}
                if gone:  # entries deleted under us: nothing to hand back
                    self.client.xack(stream, GROUP_WORKERS, *gone)
                if not self.client.xpending_range(stream, GROUP_WORKERS, min="-", max="+",
                                                  count=1, consumername=self.id):
                    self.client.xgroup_delconsumer(stream, GROUP_WORKERS, self.id)
            self.client.delete(self.keys.worker(self.id))
            self.client.zrem(self.keys.workers(), self.id)
        except redis.RedisError as exc:
            log.error("cannot leave cleanly: left for the reaper", error=str(exc))

    # -- heartbeat and control -----------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        failures = 0
        period = self.settings.heartbeat_s
        while True:
            try:
                self._beat()
                failures, wait = 0, period
            except redis.RedisError as exc:
                failures += 1
                log.warning("heartbeat failed", error=str(exc), tries=failures)
                wait = retry_delay_s(failures, min(0.25, period), 2.0, period)
            if self.cgroups is not None:
                self.cgroups.sweep()
            if self._halt.wait(wait):
                return

    def _beat(self) -> None:
        with self._slots:
            runs = list(self._running.values())
        running = [(run.job_id, run.token) for run in runs]
        fields: dict[str, str | int] = {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "queues": ",".join(self.queues),
            "slots": self.slots,
            "started_at": self.started_at,
            "version": VERSION,
            **self.resources,
        }
        call = sc.heartbeat(self.keys, self.id, running, fields,
                            ttl_ms=int(self.settings.worker_ttl_s * 1000))
        sent_at = monotonic()
        cancelled, lost = self.scripts.run(call)
        gone = {str(job_id) for job_id in lost}
        for run in runs:
            if run.job_id not in gone:
                run.confirmed_at = max(run.confirmed_at, sent_at)
        for job_id in cancelled:
            self._cancel_local(str(job_id), via="heartbeat")
        for job_id in lost:
            # frozen or cut off past our TTL: the reaper gave the job to another attempt,
            # so kill our copy and do not finish it (finish.lua would refuse anyway)
            self._cancel_local(str(job_id), via="heartbeat", reason=LOST)

    def _cancel_local(self, job_id: str, *, via: str, reason: str = CANCELLED) -> None:
        with self._slots:
            run = self._running.get(job_id)
        if run is not None and run.abort(reason):
            log.info("stopping job", job_id=job_id, via=via, reason=reason)

    def _control_loop(self) -> None:
        failures = 0
        while not self._halt.is_set():
            try:
                self._listen()
                return
            except redis.RedisError as exc:
                self._subscribed.clear()
                failures += 1
                log.warning("control channel lost", error=str(exc), tries=failures)
                self._halt.wait(retry_delay_s(failures, 0.2, 2.0, 5.0))

    def _listen(self) -> None:
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.keys.control_channel(self.id))
            poll = max(0.05, min(1.0, self.block_ms / 1000))
            while not self._halt.is_set():
                msg = pubsub.get_message(timeout=poll)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    self._subscribed.set()
                elif msg["type"] == "message":
                    self._on_control(str(msg["data"]))
        finally:
            pubsub.close()

    def _on_control(self, data: str) -> None:
        command, _, arg = data.partition(" ")
        if command == "cancel" and arg:
            self._cancel_local(arg.strip(), via="control")
        else:
            log.warning("unknown control message", message=data[:200])


def _by_queue(batch: list[Entry]) -> dict[str, list[tuple[str, str]]]:
    by_queue: dict[str, list[tuple[str, str]]] = {}
    for queue, entry_id, job_id in batch:
        by_queue.setdefault(queue, []).append((entry_id, job_id))
    return by_queue


def _stream_items(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREADGROUP's answer (RESP2: a list of [stream, entries]) as (stream, entries)."""
    return [(stream, items) for stream, items in reply or []]
