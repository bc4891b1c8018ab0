"""What every scheduler duty works with: settings, one Redis client, the scripts, the key
map and this scheduler's id (the `by` of the events it writes)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from common import scripts as sc
from common.keys import Keys
from common.scripts import Batch
from common.settings import Settings


def new_scheduler_id() -> str:
    return f"sched-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class Context:
    settings: Settings
    client: redis.Redis
    scripts: sc.Scripts
    keys: Keys
    me: str

    @property
    def step_ms(self) -> int:
        return int(self.settings.priority_step_s * 1000)

    @property
    def maxlen(self) -> int:
        return self.settings.events_maxlen

    def redis_now_ms(self) -> int:
        """Redis' clock: the one every lease, delay and expiry is measured against."""
        sec, usec = self.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    def due(self, zset: str) -> list[tuple[str, str, str | None]]:
        """Members of a zset scored by ms whose time has come by Redis' clock (a batch),
        with each job's queue and host: the candidates a due-ness script re-checks."""
        ids = self.client.zrangebyscore(zset, "-inf", self.redis_now_ms(), start=0,
                                        num=self.settings.dispatch_batch)
        rows = self.job_fields(ids, "queue", "host")
        return [(j, q or "default", h or None) for j, (q, h) in zip(ids, rows, strict=True)]

    def job_fields(self, job_ids: list[str], *fields: str) -> list[list[str | None]]:
        """HMGET the same fields of many jobs in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), *fields)
        return list(pipe.execute()) if job_ids else []

    def execute(self, build: Callable[[Batch], object]) -> list[Any]:
        """One round trip for many commands and script calls (`Scripts.execute`)."""
        return self.scripts.execute(build)
