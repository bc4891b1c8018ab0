"""Time in one place, so tests control it. Lua scripts use Redis' own clock (TIME)
for everything that leases, expires or orders; this module serves the Python side."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def monotonic() -> float:
    """Seconds from an arbitrary point; for deadlines and durations inside one process."""
    return time.monotonic()


def ms_to_iso(ms: int | None) -> str | None:
    """ISO 8601 UTC text for a millisecond timestamp (None stays None)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def iso_to_ms(value: datetime) -> int:
    """Milliseconds since the epoch for an aware datetime (naive ones are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)
