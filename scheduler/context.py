"""What every scheduler duty works with: settings, one Redis client, the scripts, the key
map and this scheduler's id (the `by` of the events it writes)."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from redis.exceptions import NoScriptError

from common import scripts as sc
from common.keys import Keys
from common.settings import Settings


@cache
def sha(script: str) -> str:
    return hashlib.sha1(sc.source(script).encode()).hexdigest()


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

    # -- one round trip for many commands and script calls ----------------------------
    def execute(self, build: Callable[[Batch], object]) -> list[Any]:
        """Send what `build` queues on a fresh Batch in one round trip; the first error is
        raised after all ran. Script calls the server did not know (it restarted, or
        SCRIPT FLUSH) did not run: the scripts are loaded and those calls sent again."""
        batch = Batch(self.client.pipeline(transaction=False))
        build(batch)
        results = list(batch.pipe.execute(raise_on_error=False))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name in {batch.calls[i].script for i in missing}:
                self.client.script_load(sc.source(name))
            again = Batch(self.client.pipeline(transaction=False))
            for i in missing:
                again.script(batch.calls[i])
            for i, r in zip(missing, again.pipe.execute(raise_on_error=False), strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results


class Batch:
    """A pipeline whose script calls go by sha as plain EVALSHAs (redis-py's Script objects
    make a pipeline send SCRIPT EXISTS first: one more round trip every time). Other
    commands are the pipeline's own."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: dict[int, sc.Call] = {}  # position in the pipeline → the script call

    def script(self, call: sc.Call) -> None:
        self.calls[len(self.pipe)] = call
        self.pipe.evalsha(sha(call.script), len(call.keys), *call.keys, *call.args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __len__(self) -> int:
        return len(self.pipe)
