"""One shallow error tree. The API maps it to HTTP once (api/errors.py), the CLI once
(cli/main.py)."""

from __future__ import annotations

from typing import Any


class TidalError(Exception):
    """Base of every error Tidal raises on purpose."""

    code = "tidal_error"
    status = 500

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidSubmission(TidalError):
    code = "invalid_submission"
    status = 422


class JobNotFound(TidalError):
    code = "not_found"
    status = 404


class Conflict(TidalError):
    """The request contradicts the job's state (e.g. cancelling a finished job)."""

    code = "conflict"
    status = 409


class LimitExceeded(TidalError):
    code = "limit_exceeded"
    status = 429


class Unauthorized(TidalError):
    code = "unauthorized"
    status = 401


class Forbidden(TidalError):
    code = "forbidden"
    status = 403


class RedisUnavailable(TidalError):
    code = "redis_unavailable"
    status = 503


class LockLost(TidalError):
    """A stale attempt tried to act on a job it no longer owns (fencing)."""

    code = "lock_lost"
    status = 409


class ScriptError(TidalError):
    """A Lua script answered with an error code no caller expected."""

    code = "script_error"
    status = 500
