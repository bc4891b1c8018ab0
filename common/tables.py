"""SQLModel tables of the SQL mirror (history). Wire models are in common/models.py.
Times are integer milliseconds since the epoch (as in Redis)."""

from __future__ import annotations

from sqlalchemy import UniqueConstraint
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
    finished_at: int | None = None
    exit_code: int | None = None
    result: str | None = None  # JSON text
    error: str | None = None
    reason: str | None = None
    spec: str = "{}"  # the submission, JSON text
    seq: int = 0  # sequence number of the last event applied


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


class ApiToken(SQLModel, table=True):
    __tablename__ = "tokens"

    hash: str = Field(primary_key=True)  # sha256 of the token; the token itself is never stored
    user: str = Field(index=True)
    admin: bool = False
    created_at: int = 0
