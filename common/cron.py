"""Cron schedules: a schedule fires a job submission at each tick of its cron expression
(croniter parses them). Stored in Redis: `Keys.cron()` zset (name → next fire ms) and
`Keys.cron_specs()` hash (name → this module's Schedule as JSON)."""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.models import JobSubmission, Name


def next_fire_ms(expression: str, after_ms: int) -> int:
    """The first tick of `expression` strictly after `after_ms` (UTC)."""
    start = datetime.fromtimestamp(after_ms / 1000, tz=UTC)
    nxt: datetime = croniter(expression, start).get_next(datetime)
    return int(nxt.timestamp() * 1000)


class ScheduleCreate(BaseModel):
    """POST /schedules: a name, a cron expression (UTC) and the job to submit each tick."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    cron: str = Field(max_length=200, description="five-field cron expression, UTC")
    job: JobSubmission

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r}")
        return value


class Schedule(ScheduleCreate):
    owner: str
    next_fire_at: datetime | None = None
