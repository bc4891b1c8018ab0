"""Wire models: what REST, the SDK and the CLI exchange (SQL tables live in common/tables.py).

Validation here is the first line of the bad-input table in RELIABILITY.md §4: names are
restricted to a safe alphabet (they become Redis key parts), text may not carry NUL or
lone surrogates, sizes are capped, numbers are bounded, unknown fields are refused.
"""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
MODULE_FUNC_RE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_BYTES = 64 * 1024
MAX_ARGS_BYTES = 1024 * 1024


class State(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED, State.EXPIRED})


class Priority(IntEnum):
    """Level index used in the score: lower runs first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4

    @classmethod
    def parse(cls, value: str | int) -> Priority:
        if isinstance(value, int):
            return cls(value)
        return cls[value.strip().upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


PriorityName = Literal["critical", "high", "normal", "low", "background"]


def _clean_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 text") from exc
    return value


CleanStr = Annotated[str, AfterValidator(_clean_text)]


def _callback_url(value: str) -> str:
    """An absolute http(s) URL with a host and no spaces or control characters."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    try:
        parts.port  # noqa: B018 (parsing it checks it)
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain spaces or control characters")
    return value


CallbackUrl = Annotated[str, Field(max_length=2048), AfterValidator(_callback_url)]
Name = Annotated[str, Field(pattern=NAME_RE)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]


def _json_size(value: Any) -> int:
    return len(orjson.dumps(value))


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(default=0, ge=0, le=1024)
    memory_mb: int = Field(default=0, ge=0, le=16 * 1024 * 1024)
    gpu: int = Field(default=0, ge=0, le=64)


class Dependency(BaseModel):
    """A dependency with a condition: run after it completed (`success`, the default),
    after it failed, was cancelled or expired (`failure`), or after it ended at all
    (`any`, e.g. a clean-up job)."""

    model_config = ConfigDict(extra="forbid")
    id: Name
    on: Literal["success", "failure", "any"] = "success"


class JobSubmission(BaseModel):
    """One job as a user submits it (POST /jobs takes one or a list)."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_COMMAND_BYTES)

    kind: Literal["shell", "python"] = "shell"
    command: list[CleanStr] | CleanStr | None = Field(
        default=None,
        description="shell jobs: an argv list, or one string run through /bin/sh -c",
    )
    function: Annotated[str, Field(pattern=MODULE_FUNC_RE, max_length=256)] | None = Field(
        default=None, description="python jobs: 'package.module:function'"
    )
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    env: dict[EnvName, CleanStr] = Field(default_factory=dict)
    cwd: CleanStr | None = Field(default=None, max_length=4096)
    queue: Name = "default"
    priority: PriorityName = "normal"
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")
    retries: int = Field(default=0, ge=0, le=100)
    retry_delay: float = Field(default=5.0, ge=0, le=24 * 3600, description="seconds")
    retry_backoff: float = Field(default=2.0, ge=1.0, le=10.0)
    retry_max_delay: float = Field(default=300.0, ge=0, le=7 * 24 * 3600, description="seconds")
    host: Name | None = None
    depends_on: list[Name | Dependency] = Field(
        default_factory=list, max_length=1000,
        description="job ids (run after they completed) or {id, on: success|failure|any}",
    )
    resources: Resources = Field(default_factory=Resources)
    scheduled_at: datetime | None = None
    stale_after: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)
    idempotency_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,200}$")] | None = None
    tags: dict[Name, Annotated[CleanStr, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=64
    )
    callback_url: CallbackUrl | None = Field(
        default=None, description="POSTed the job document when the job ends (docs/live.md)"
    )

    @model_validator(mode="after")
    def _check_work(self) -> JobSubmission:
        if self.kind == "shell":
            if self.command is None or self.command == [] or self.command == "":
                raise ValueError("command: a shell job needs a command (argv list or string)")
            if self.function is not None:
                raise ValueError("function: only python jobs take a function")
            size = _json_size(self.command)
            if size > MAX_COMMAND_BYTES:
                raise ValueError(f"command: {size} bytes is over the {MAX_COMMAND_BYTES} limit")
        else:
            if not self.function:
                raise ValueError("function: a python job needs 'module:function'")
            if self.command is not None:
                raise ValueError("command: only shell jobs take a command")
            size = _json_size([self.args, self.kwargs])
            if size > MAX_ARGS_BYTES:
                raise ValueError(f"args: {size} bytes is over the {MAX_ARGS_BYTES} limit")
        if _json_size(self.env) > MAX_ENV_BYTES:
            raise ValueError(f"env: over the {MAX_ENV_BYTES} bytes limit")
        return self

    def dependencies(self) -> list[Dependency]:
        """depends_on with every entry in the long form."""
        return [d if isinstance(d, Dependency) else Dependency(id=d) for d in self.depends_on]

    def argv(self) -> list[str]:
        """The argv a worker executes for a shell job."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command or [])


class Progress(BaseModel):
    """The last progress the job's current attempt reported (docs/live.md#progress)."""

    percent: float | None = None
    stage: str | None = None
    message: str | None = None
    time: datetime | None = Field(default=None, description="when it was reported")


class ProgressUpdate(BaseModel):
    """A progress report as a follower sees it (an SSE `progress` frame, a WebSocket
    `progress` message, an item of `Client.follow(progress=True)`): `id` is its log
    stream entry id, so it resumes like a line."""

    id: str
    time: datetime
    percent: float
    stage: str | None = None
    message: str | None = None


class Job(BaseModel):
    """The job document: the submission grown with its state."""

    id: str
    state: State
    owner: str
    kind: Literal["shell", "python"]
    queue: str
    priority: PriorityName
    host: str | None = None
    command: list[str] | str | None = None
    function: str | None = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    retries: int = 0
    depends_on: list[str | Dependency] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    scheduled_at: datetime | None = None
    stale_after: float | None = None
    idempotency_key: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = None
    wait_reason: str | None = None
    wait_detail: dict[str, Any] | None = Field(
        default=None, description="why it is not running, in detail (queued jobs only)"
    )
    attempt: int = 0
    worker: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    result: Any = None
    error: str | None = None
    reason: str | None = None
    progress: Progress | None = None
    peak_rss_kb: int | None = Field(
        default=None, description="shell jobs: peak RSS of the process tree, in kB")
    cpu_s: float | None = Field(
        default=None, description="shell jobs: CPU seconds (user + system) of the process tree")
    wait_ms: int | None = Field(
        default=None, description="started_at − the later of created_at and scheduled_at")
    run_ms: int | None = Field(default=None, description="finished_at − started_at")
    poll_after_ms: int | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="GET /jobs/{id} of an unfinished job: ask again after this many ms "
        "(grows with `polls`, at most 30000); absent once the job has finished",
    )


class JobBatch(BaseModel):
    """The answer to a batch submission (POST /jobs with a list): jobs in request order."""

    jobs: list[Job]


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


class LogLine(BaseModel):
    id: str
    stream: Literal["stdout", "stderr", "system"]
    time: datetime
    text: str


class LogPage(BaseModel):
    job_id: str
    lines: list[LogLine]
    next_cursor: str | None = None


class JobEvent(BaseModel):
    """One transition of a job: its per-job sequence number, when, the state entered, who
    made it (a user, a scheduler or a worker id) and the event's other fields."""

    seq: int
    time: datetime
    state: str
    by: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class JobEvents(BaseModel):
    """GET /jobs/{id}/events. `complete` is false when the job has transitions that neither
    the SQL mirror nor the recent part of the events stream holds (the mirror lags)."""

    job_id: str
    events: list[JobEvent]
    complete: bool = True


class QueueInfo(BaseModel):
    """GET /queues: one queue now. `queued` counts the jobs waiting in the queue for a slot
    (not those waiting for a host, dependencies, resources or a start time); `delayed`
    counts scheduled starts and retry back-offs (from the SQL mirror)."""

    queue: str
    queued: int = 0
    in_flight: int = 0
    running: int = 0
    delayed: int = 0
    workers: int = 0
    slots: int = 0
    completed_1m: int = 0
    failed_1m: int = 0
    completed_1h: int = 0
    failed_1h: int = 0


class WorkerInfo(BaseModel):
    id: str
    hostname: str
    pid: int
    queues: list[str]
    slots: int
    running: list[str]
    last_heartbeat: datetime | None = None
    started_at: datetime | None = None


class HostInfo(BaseModel):
    """A host: the job holding it and the jobs waiting for it, in the order they will run."""

    host: str
    holder: str | None = None
    waiters: list[str] = Field(default_factory=list)
    waiting: int = 0


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: Name
    admin: bool = False


class TokenCreated(BaseModel):
    user: str
    admin: bool
    token: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    database: bool
    version: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody
