"""SQLModel tables of the SQL mirror (history). Wire models are in common/models.py.
Times are integer milliseconds since the epoch (as in Redis)."""

from __future__ import annotations

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, SQLModel


class JobRecord(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    queue: str = Field(index=True)
    state: str = Field(index=True)
    kind: str
    priority: int = 2
    host: str | None = Field(default=None, index=True)
    attempt: int = 0
    worker: str | None = None
    wait_reason: str | None = None
    created_at: int | None = Field(default=None, index=True)
    started_at: int | None = None
    finished_at: int | None = Field(default=None, index=True)  # rates in GET /queues
    exit_code: int | None = None
    result: str | None = None  # JSON text
    error: str | None = None
    reason: str | None = None
    spec: str = "{}"  # the submission, JSON text
    seq: int = 0  # sequence number of the last event applied
    # added after the first release: nullable, so common/db.py can add them to an old table
    wait_ms: int | None = None  # started − max(created, scheduled_at, due_at): last attempt
    run_ms: int | None = None  # finished − started
    peak_rss_kb: int | None = None  # shell jobs: peak RSS of the process tree (worker)
    cpu_s: float | None = None  # shell jobs: CPU seconds of the process tree (worker)


class EventRecord(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_event_job_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    seq: int
    state: str
    at: int
    by: str = ""
    data: str = "{}"  # extra fields of the event, JSON text


class LogRecord(SQLModel, table=True):
    """One line of a finished job's log, copied from its Redis log stream by the recorder
    when it applies the job's terminal event (the API serves it once the stream expired).
    Ordered by the stream entry id, kept as its two numbers."""

    __tablename__ = "logs"
    __table_args__ = (
        UniqueConstraint("job_id", "entry_id", name="uq_log_job_entry"),
        Index("ix_logs_job_order", "job_id", "entry_ms", "entry_seq"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str
    entry_id: str  # the stream entry id, "<ms>-<seq>"
    entry_ms: int
    entry_seq: int
    stream: str  # stdout | stderr | system
    t: int  # when the worker read the line (ms)
    text: str
    cont: bool = False  # a piece of an over-long line that continues in the next entry


class CallbackRecord(SQLModel, table=True):
    """A POST of a finished job's document to its `callback_url` (an outbox row): written by
    the recorder with the job's terminal event, delivered by scheduler/callbacks.py."""

    __tablename__ = "callbacks"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_callback_job_seq"),
        Index("ix_callbacks_due", "status", "next_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    seq: int  # the terminal event it reports
    url: str
    status: str = "pending"  # pending | delivered | failed (gave up)
    attempts: int = 0
    next_at: int = 0  # ms: not before
    claimed_until: int = 0  # ms: a sender is delivering it until then
    status_code: int | None = None  # of the last answer
    error: str | None = None  # why the last attempt failed
    updated_at: int = 0  # ms


class ApiToken(SQLModel, table=True):
    __tablename__ = "tokens"

    hash: str = Field(primary_key=True)  # sha256 of the token; the token itself is never stored
    user: str = Field(index=True)
    admin: bool = False
    created_at: int = 0


# -- log lines between the Redis stream entry and the row ----------------------------------

LOG_STREAM_NAMES = {"o": "stdout", "e": "stderr", "x": "system"}
_LOG_STREAM_CODES = {name: code for code, name in LOG_STREAM_NAMES.items()}


def log_row(job_id: str, entry_id: str, fields: dict[str, str]) -> dict[str, object]:
    """A LogRecord row (as a dict for a bulk insert) from one log stream entry, whose fields
    are those the worker writes: s (o|e|x), t (ms), l (the text), c=1 (continued)."""
    ms, _, seq = entry_id.partition("-")
    t = fields.get("t", "")
    return {
        "job_id": job_id, "entry_id": entry_id, "entry_ms": int(ms), "entry_seq": int(seq or 0),
        "stream": LOG_STREAM_NAMES.get(fields.get("s", ""), "system"),
        "t": int(t) if t.isdigit() else int(ms), "text": fields.get("l", ""),
        "cont": fields.get("c") == "1",
    }


def log_entry(rec: LogRecord) -> tuple[str, dict[str, str]]:
    """The log stream entry a LogRecord was copied from (the inverse of `log_row`)."""
    fields = {"s": _LOG_STREAM_CODES.get(rec.stream, "x"), "t": str(rec.t), "l": rec.text}
    if rec.cont:
        fields["c"] = "1"
    return rec.entry_id, fields
