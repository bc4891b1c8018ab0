"""The one place that makes Redis clients, with the settings the reliability notes ask for.

redis-py's own retries are turned off (they duplicate non-idempotent writes such as XADD:
RELIABILITY.md finding 4); callers decide what to retry.
"""

from __future__ import annotations

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect(url: str, *, timeout: float | None = 10.0) -> redis.Redis:
    """A thread-safe, pooled, synchronous client that returns str."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )


def connect_async(url: str, *, timeout: float | None = 10.0) -> aredis.Redis:
    """The asyncio twin of `connect`, used by the API."""
    return aredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
