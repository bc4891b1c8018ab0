"""The recorder: mirrors the events stream into SQL (jobs and their events), in batched
transactions. Idempotent: an event applied twice changes nothing (events are unique by
(job, seq); a job row only moves forward in seq), so reading at-least-once is safe.
It acknowledges a batch only after its transaction committed.

When it applies a job's terminal event it also copies the job's log stream (capped by the
worker at `log_max_lines`) into the `logs` table, in pages, lines unique by (job, entry id):
the API serves the log from there once the Redis copy has expired. The worker writes every
line before it finishes the job, so at the terminal event the stream is complete.

With the terminal event of a job that has a `callback_url` it writes a `callbacks` row in
the same transaction; `run()` delivers those off its own thread (scheduler/callbacks.py)."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from sqlalchemy import bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from common import scripts as sc
from common.clock import monotonic
from common.db import make_engine
from common.jobs import durations
from common.keys import GROUP_RECORDER, Keys
from common.logging import get_logger
from common.models import TERMINAL_STATES
from common.settings import Settings
from common.streams import ensure_group
from common.tables import CallbackRecord, EventRecord, JobRecord, LogRecord, log_row
from scheduler.callbacks import CallbackSender, callback_rows

log = get_logger("recorder")

EVENT_FIELDS = {"job", "seq", "state", "at", "by"}
EVENT_COLUMNS = ("job_id", "seq", "state", "at", "by", "data")
JOB_COLUMNS = (
    "owner", "queue", "state", "kind", "priority", "host", "attempt", "worker", "wait_reason",
    "created_at", "started_at", "finished_at", "exit_code", "result", "error", "reason", "spec",
    "peak_rss_kb", "cpu_s",
)
INT_COLUMNS = {"priority", "attempt", "created_at", "started_at", "finished_at", "exit_code",
               "peak_rss_kb"}
FLOAT_COLUMNS = {"cpu_s"}
DERIVED_COLUMNS = ("wait_ms", "run_ms")  # computed from the times (job_row)
# the hash fields one HMGET per job reads: the columns, and what wait_ms is measured from
HASH_FIELDS = (*JOB_COLUMNS, "scheduled_at", "due_at")
GATHER_S = 0.05  # a small batch of new events waits this long for more (Recorder.step)
CLAIM_EVERY_S = 5.0  # look for entries other recorders abandoned this often
LOG_PAGE = 1000  # log entries per XRANGE and per insert when a finished job's log is copied


def _value(column: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    try:
        if column in INT_COLUMNS:
            return int(raw)
        if column in FLOAT_COLUMNS:
            return float(raw)
    except ValueError:
        return None
    return raw


def job_row(job_id: str, h: dict[str, str], seq: int) -> dict[str, Any]:
    """A JobRecord row from a job hash, stamped with the seq of the newest event seen.
    wait_ms = started − when it could first run: max(created, scheduled_at, due_at), where
    due_at is when a delayed start or a retry's back-off came due (promote_due.lua, which
    drops scheduled_at); run_ms = finished − started. Both of the last attempt."""
    row: dict[str, Any] = {"id": job_id, "seq": seq}
    for column in JOB_COLUMNS:
        row[column] = _value(column, h.get(column))
    row["owner"] = row["owner"] or ""
    row["queue"] = row["queue"] or "default"
    row["kind"] = row["kind"] or "shell"
    row["priority"] = 2 if row["priority"] is None else row["priority"]
    row["attempt"] = row["attempt"] or 0
    row["spec"] = row["spec"] or "{}"
    row["wait_ms"], row["run_ms"] = durations(h, {})
    return row


def _int_or_none(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _float_or_none(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _str_or_none(raw: str | None) -> str | None:
    return raw or None


_DEFAULTS = {"owner": "", "queue": "default", "kind": "shell", "priority": 2, "attempt": 0,
             "spec": "{}"}
# the jobs table's columns in its own order (the order the compiled upsert binds them)
FULL_COLUMNS = tuple(c.name for c in JobRecord.__table__.columns)  # type: ignore[attr-defined]
_PLAN = tuple((c, _int_or_none if c in INT_COLUMNS else _float_or_none if c in FLOAT_COLUMNS
               else _str_or_none if c in JOB_COLUMNS else None, _DEFAULTS.get(c))
              for c in FULL_COLUMNS)


def job_values(job_id: str, h: dict[str, str], seq: int) -> tuple[Any, ...]:
    """`job_row` as a tuple in FULL_COLUMNS order (the recorder's hot path: no dict)."""
    wait_ms, run_ms = durations(h, {})
    computed = {"id": job_id, "seq": seq, "wait_ms": wait_ms, "run_ms": run_ms}
    get = h.get
    out: list[Any] = []
    for column, convert, default in _PLAN:
        if convert is None:
            out.append(computed[column])
            continue
        value = convert(get(column))
        out.append(default if value is None and default is not None else value)
    return tuple(out)


class Recorder:
    def __init__(self, settings: Settings, client: redis.Redis, engine: Engine | None = None):
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.prefix)
        self.engine = engine or make_engine(settings)
        self.me = f"recorder-{socket.gethostname()}-{os.getpid()}"
        self.callbacks: CallbackSender | None = None  # made by run(): catch_up() posts nothing
        self.statements = Statements(self.engine)
        self.scripts = sc.Scripts(client)
        self._acks: list[str] = []  # committed, to acknowledge with the next read
        self._own_pending = True  # look at our own pending entries first (start, errors)
        self._claim_at = 0.0  # monotonic: when to look for abandoned entries next

    # -- loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        backoff = 0.1
        ensured = False
        self.callbacks = CallbackSender(self.client, self.keys, self.engine)
        while not stop.is_set():
            try:
                if not ensured:
                    ensure_group(self.client, self.keys.events(), GROUP_RECORDER)
                    ensured = True
                self.step(block_ms=500, gather=stop)
                self.callbacks.tick()
                backoff = 0.1
            except (redis.RedisError, SQLAlchemyError) as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: create the group again
                    ensured = False
                self._own_pending = True  # what failed is read again from the pending list
                log.warning("recorder error; retrying", error=str(exc), retry_in=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.flush_acks()
        self.callbacks.close()

    def step(self, block_ms: int | None = None, gather: threading.Event | None = None) -> int:
        """Apply one batch: entries this recorder left unacknowledged first (at start and
        after an error), then entries other recorders abandoned (looked for every
        CLAIM_EVERY_S), then new ones. block_ms None means don't wait (never 0, which
        blocks forever). A batch is acknowledged after its transaction committed, along
        with the next read (one round trip for both).

        With `gather` (the loop's stop event), a small batch of new entries waits GATHER_S
        for more before it is applied: a job's events (pending → completed) come within a
        few milliseconds, and applying them as they come would cost a transaction each,
        taken from the scheduler and the worker just when the job needs them (idle latency)
        and spread thin when busy. The mirror lags by GATHER_S more; nothing waits on it."""
        items: list[tuple[str, dict[str, str]]] = []
        if self._own_pending:
            items = self._read("0", None)
            self._own_pending = bool(items)
        if not items and monotonic() >= self._claim_at:
            items = self._claim()
            self._claim_at = monotonic() + CLAIM_EVERY_S if not items else 0.0
        if not items:
            items = self._read(">", block_ms)
            want = self.settings.recorder_batch - len(items)
            if gather is not None and items and want > self.settings.recorder_batch // 2:
                gather.wait(GATHER_S)
                items += self._read(">", None, count=want)
        if not items:
            return 0
        self.apply(items)
        self._acks.extend(eid for eid, _ in items)
        return len(items)

    def catch_up(self) -> int:
        """Apply everything available now (tests, `tidal doctor`)."""
        ensure_group(self.client, self.keys.events(), GROUP_RECORDER)
        self._own_pending, self._claim_at = True, 0.0
        total = 0
        while n := self.step():
            total += n
        self.flush_acks()
        return total

    def flush_acks(self) -> None:
        if self._acks:
            self.client.xack(self.keys.events(), GROUP_RECORDER, *self._acks)
            self._acks.clear()

    def _read(self, start: str, block_ms: int | None, count: int | None = None
              ) -> list[tuple[str, dict[str, str]]]:
        pipe = self.client.pipeline(transaction=False)
        if self._acks:
            pipe.xack(self.keys.events(), GROUP_RECORDER, *self._acks)
        pipe.xreadgroup(GROUP_RECORDER, self.me, {self.keys.events(): start},
                        count=count or self.settings.recorder_batch, block=block_ms)
        got = pipe.execute()[-1]
        self._acks.clear()
        return [item for _s, items in got or [] for item in items if item[1]]

    def _claim(self) -> list[tuple[str, dict[str, str]]]:
        self.flush_acks()
        _next, items, _deleted = self.client.xautoclaim(
            self.keys.events(), GROUP_RECORDER, self.me,
            min_idle_time=int(self.settings.reclaim_idle_s * 1000), start_id="0-0",
            count=self.settings.recorder_batch,
        )
        return [item for item in items if item[1]]

    # -- apply ----------------------------------------------------------------------
    def apply(self, items: list[tuple[str, dict[str, str]]]) -> None:
        """One transaction for the batch: event rows (duplicates ignored) and one row per
        job (its newest state in the batch) upserted from the job hash, or from the events
        when the hash has expired. Prebuilt statements, each run once for all its rows,
        with plain tuples (the DB-API's executemany; no per-row SQLAlchemy work)."""
        newest: dict[str, int] = {}
        events: list[tuple[Any, ...]] = []
        fallback: dict[str, dict[str, str]] = {}
        ended: dict[str, int] = {}  # jobs that reached a terminal state → its seq
        dumps = orjson.dumps
        for _eid, f in items:
            job_id, seq, state = f["job"], int(f["seq"]), f["state"]
            if state in TERMINAL_STATES:
                ended[job_id] = max(seq, ended.get(job_id, 0))
            extra = {k: v for k, v in f.items() if k not in EVENT_FIELDS}
            events.append((job_id, seq, state, int(f["at"]), f.get("by", ""),
                           dumps(extra).decode()))
            if seq >= newest.get(job_id, -1):
                newest[job_id] = seq
                fallback[job_id] = {**fallback.get(job_id, {}), "state": state, **extra}
        hashes, log_lens = self._job_hashes(list(newest), set(ended))
        full: list[tuple[Any, ...]] = []
        partial: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for job_id, seq in newest.items():
            h = hashes.get(job_id)
            if h:
                full.append(job_values(job_id, h, seq))
            else:  # the hash expired: update only the columns the events told
                source = fallback[job_id]
                known = tuple(c for c in JOB_COLUMNS if source.get(c) not in (None, ""))
                partial.setdefault(known, []).append(job_row(job_id, source, seq))
        st = self.statements
        with self.engine.begin() as conn:
            st.run(conn, st.events, events)
            if full:
                st.run(conn, st.upsert_full, full)
            for known, rows in partial.items():
                conn.execute(st.upsert(known), rows)
            if callbacks := callback_rows(ended, hashes):
                conn.execute(st.callbacks, callbacks)
        # a job whose hash is gone (-1) or that wrote no log (0) has nothing to copy
        self.copy_logs([j for j in ended if log_lens.get(j, -1) != 0])

    def copy_logs(self, job_ids: list[str]) -> int:
        """Copy the log streams of these (finished) jobs into the `logs` table; lines already
        there are skipped. The first page of every job comes in one round trip. Returns the
        number of entries read."""
        if not job_ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.xrange(self.keys.log(job_id), count=LOG_PAGE)
        total = 0
        for job_id, page in zip(job_ids, pipe.execute(), strict=True):
            while page:
                with self.engine.begin() as conn:
                    conn.execute(self.statements.logs,
                                 [log_row(job_id, eid, fields) for eid, fields in page])
                total += len(page)
                if len(page) < LOG_PAGE:
                    break
                page = self.client.xrange(self.keys.log(job_id), min=f"({page[-1][0]}",
                                          count=LOG_PAGE)
        return total

    def _job_hashes(self, job_ids: list[str], ended: set[str]
                    ) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        """The fields the mirror needs of each job ({} for a job whose hash has expired),
        and the length of the log stream of the jobs in `ended`: one mirror_read.lua call
        (the field names are sent once, not once per job)."""
        if not job_ids:
            return {}, {}
        got = self.scripts.run(sc.mirror_read(self.keys, job_ids, HASH_FIELDS, ended))
        hashes: dict[str, dict[str, str]] = {}
        log_lens: dict[str, int] = {}
        for job_id, (values, log_len) in zip(job_ids, got, strict=True):
            hashes[job_id] = ({f: v for f, v in zip(HASH_FIELDS, values, strict=True)
                               if v is not None} if values[0] is not None else {})
            log_lens[job_id] = int(log_len)
        return hashes, log_lens


class Statements:
    """The recorder's statements, built once per engine. The two of every batch (events,
    full job rows) are compiled once to the driver's SQL and run with plain tuples through
    the DB-API's executemany: SQLAlchemy's per-row parameter processing was a third of the
    recorder's time."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self.events_stmt = self._insert(EventRecord).on_conflict_do_nothing()
        self.logs = self._insert(LogRecord).on_conflict_do_nothing()
        self.callbacks = self._insert(CallbackRecord).on_conflict_do_nothing()
        self._upserts: dict[tuple[str, ...] | None, Any] = {}
        self.events = self._raw(self._insert(EventRecord, EVENT_COLUMNS).on_conflict_do_nothing(),
                                EVENT_COLUMNS)
        self.upsert_full = self._raw(self.upsert(None, FULL_COLUMNS), FULL_COLUMNS)

    def _insert(self, model: Any, columns: tuple[str, ...] | None = None) -> Any:
        table = model.__table__
        insert = (postgresql.insert(table) if self.dialect.name == "postgresql"
                  else sqlite.insert(table))
        if columns is not None:  # every row binds exactly these, in this order
            insert = insert.values({c: bindparam(c) for c in columns})
        return insert

    def _raw(self, stmt: Any, columns: tuple[str, ...]) -> RawStatement:
        compiled = stmt.compile(dialect=self.dialect)
        if compiled.positional and tuple(compiled.positiontup or ()) != columns:
            raise RuntimeError(f"unexpected bind order {compiled.positiontup} for {columns}")
        return RawStatement(compiled.string, columns, bool(compiled.positional))

    @staticmethod
    def run(conn: Connection, stmt: RawStatement, rows: list[tuple[Any, ...]]) -> None:
        """executemany of `rows` (tuples in the statement's column order)."""
        if not rows:
            return
        params: Any = rows if stmt.positional else [dict(zip(stmt.columns, r, strict=True))
                                                    for r in rows]
        conn.exec_driver_sql(stmt.sql, params)

    def upsert(self, known: tuple[str, ...] | None, columns: tuple[str, ...] | None = None
               ) -> Any:
        """Insert or update job rows, never moving one back in seq. `known` limits the
        update to those columns (when the job hash has already expired)."""
        stmt = self._upserts.get(known) if columns is None else None
        if stmt is None:
            table = JobRecord.__table__  # type: ignore[attr-defined]
            insert = self._insert(JobRecord, columns)
            updated = ([*JOB_COLUMNS, *DERIVED_COLUMNS, "seq"] if known is None
                       else [*known, "seq"])
            stmt = insert.on_conflict_do_update(
                index_elements=["id"],
                set_={c: insert.excluded[c] for c in updated},
                where=table.c.seq <= insert.excluded.seq,
            )
            if columns is None:
                self._upserts[known] = stmt
        return stmt


@dataclass(frozen=True, slots=True)
class RawStatement:
    sql: str
    columns: tuple[str, ...]
    positional: bool
