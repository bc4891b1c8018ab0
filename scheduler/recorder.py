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
from typing import Any

import orjson
import redis
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from common.db import make_engine
from common.keys import GROUP_RECORDER, Keys
from common.logging import get_logger
from common.models import TERMINAL_STATES
from common.settings import Settings
from common.streams import ensure_group
from common.tables import CallbackRecord, EventRecord, JobRecord, LogRecord, log_row
from scheduler.callbacks import CallbackSender, callback_rows

log = get_logger("recorder")

EVENT_FIELDS = {"job", "seq", "state", "at", "by"}
JOB_COLUMNS = (
    "owner", "queue", "state", "kind", "priority", "host", "attempt", "worker", "wait_reason",
    "created_at", "started_at", "finished_at", "exit_code", "result", "error", "reason", "spec",
)
INT_COLUMNS = {"priority", "attempt", "created_at", "started_at", "finished_at", "exit_code"}
LOG_PAGE = 1000  # log entries per XRANGE and per insert when a finished job's log is copied


def _value(column: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    return int(raw) if column in INT_COLUMNS else raw


def job_row(job_id: str, h: dict[str, str], seq: int) -> dict[str, Any]:
    """A JobRecord row from a job hash, stamped with the seq of the newest event seen."""
    row: dict[str, Any] = {"id": job_id, "seq": seq}
    for column in JOB_COLUMNS:
        row[column] = _value(column, h.get(column))
    row["owner"] = row["owner"] or ""
    row["queue"] = row["queue"] or "default"
    row["kind"] = row["kind"] or "shell"
    row["priority"] = 2 if row["priority"] is None else row["priority"]
    row["attempt"] = row["attempt"] or 0
    row["spec"] = row["spec"] or "{}"
    return row


class Recorder:
    def __init__(self, settings: Settings, client: redis.Redis, engine: Engine | None = None):
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.prefix)
        self.engine = engine or make_engine(settings)
        self.me = f"recorder-{socket.gethostname()}-{os.getpid()}"
        self.callbacks: CallbackSender | None = None  # made by run(): catch_up() posts nothing

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
                self.step(block_ms=500)
                self.callbacks.tick()
                backoff = 0.1
            except (redis.RedisError, SQLAlchemyError) as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: create the group again
                    ensured = False
                log.warning("recorder error; retrying", error=str(exc), retry_in=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.callbacks.close()

    def step(self, block_ms: int | None = None) -> int:
        """Apply one batch: entries this recorder left unacknowledged first (after an
        error), then entries other recorders abandoned, then new ones. block_ms None
        means don't wait (never 0, which blocks forever)."""
        items = self._read("0", None) or self._claim() or self._read(">", block_ms)
        if not items:
            return 0
        self.apply(items)
        self.client.xack(self.keys.events(), GROUP_RECORDER, *[eid for eid, _ in items])
        return len(items)

    def catch_up(self) -> int:
        """Apply everything available now (tests, `tidal doctor`)."""
        ensure_group(self.client, self.keys.events(), GROUP_RECORDER)
        total = 0
        while n := self.step():
            total += n
        return total

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        got = self.client.xreadgroup(
            GROUP_RECORDER, self.me, {self.keys.events(): start},
            count=self.settings.recorder_batch, block=block_ms,
        )
        return [item for _s, items in got or [] for item in items if item[1]]

    def _claim(self) -> list[tuple[str, dict[str, str]]]:
        _next, items, _deleted = self.client.xautoclaim(
            self.keys.events(), GROUP_RECORDER, self.me,
            min_idle_time=int(self.settings.reclaim_idle_s * 1000), start_id="0-0",
            count=self.settings.recorder_batch,
        )
        return [item for item in items if item[1]]

    # -- apply ----------------------------------------------------------------------
    def apply(self, items: list[tuple[str, dict[str, str]]]) -> None:
        """One transaction for the batch: event rows (duplicates ignored) and job rows
        upserted from the job hashes (or from the events when a hash has expired)."""
        newest: dict[str, int] = {}
        events: list[dict[str, Any]] = []
        fallback: dict[str, dict[str, str]] = {}
        ended: dict[str, int] = {}  # jobs that reached a terminal state → its seq
        for _eid, f in items:
            job_id, seq = f["job"], int(f["seq"])
            if f["state"] in TERMINAL_STATES:
                ended[job_id] = max(seq, ended.get(job_id, 0))
            extra = {k: v for k, v in f.items() if k not in EVENT_FIELDS}
            events.append({"job_id": job_id, "seq": seq, "state": f["state"], "at": int(f["at"]),
                           "by": f.get("by", ""), "data": orjson.dumps(extra).decode()})
            if seq >= newest.get(job_id, -1):
                newest[job_id] = seq
                fallback[job_id] = {**fallback.get(job_id, {}), "state": f["state"], **extra}
        hashes = self._job_hashes(list(newest))
        rows = [job_row(j, hashes.get(j) or fallback[j], s) for j, s in newest.items()]
        with self.engine.begin() as conn:
            conn.execute(self._insert(EventRecord, ignore=True), events)
            for row in rows:
                source = hashes.get(row["id"]) or fallback[row["id"]]
                known = [c for c in JOB_COLUMNS if source.get(c) not in (None, "")]
                conn.execute(self._upsert_job(row, known if not hashes.get(row["id"]) else None))
            if callbacks := callback_rows(ended, hashes):
                conn.execute(self._insert(CallbackRecord, ignore=True), callbacks)
        self.copy_logs(list(ended))

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
                    conn.execute(self._insert(LogRecord, ignore=True),
                                 [log_row(job_id, eid, fields) for eid, fields in page])
                total += len(page)
                if len(page) < LOG_PAGE:
                    break
                page = self.client.xrange(self.keys.log(job_id), min=f"({page[-1][0]}",
                                          count=LOG_PAGE)
        return total

    def _job_hashes(self, job_ids: list[str]) -> dict[str, dict[str, str]]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return dict(zip(job_ids, pipe.execute(), strict=True))

    def _dialect_insert(self, table: Any) -> Any:
        name = self.engine.dialect.name
        if name == "sqlite":
            return sqlite.insert(table)
        if name == "postgresql":
            return postgresql.insert(table)
        return insert(table)

    def _insert(self, model: Any, *, ignore: bool) -> Any:
        stmt = self._dialect_insert(model.__table__)
        return stmt.on_conflict_do_nothing() if ignore else stmt

    def _upsert_job(self, row: dict[str, Any], known: list[str] | None) -> Any:
        """Insert or update a job row, never moving it back in seq. `known` limits the
        update to the columns an event told (when the job hash has already expired)."""
        table = JobRecord.__table__  # type: ignore[attr-defined]
        stmt = self._dialect_insert(table).values(**row)
        columns = [c for c in row if c != "id"] if known is None else [*known, "seq"]
        return stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={c: stmt.excluded[c] for c in columns},
            where=table.c.seq <= stmt.excluded.seq,
        )
