"""How long the scheduler's loop passes take, for GET /metrics (`tidal_scheduler_loop_seconds`).

A pass is the work of one loop round (admit, dispatch, settle and the periodic duties due),
not the wait for work. Each scheduler counts its passes per bucket (cumulative, like a
Prometheus histogram) and, about once a second, writes the figures as JSON to its own key
with a short TTL, so the entry of a scheduler that died lapses; the `schedulers` zset
lists who reported (scored by the ms of the report), for the API to find the keys.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import orjson
import redis

from common.clock import now_ms
from common.keys import Keys

BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TTL_S = 15  # a scheduler reports every second; its entry lapses this long after it stopped
FORGET_MS = 3_600_000  # registry members older than this are dropped


@dataclass
class LoopStats:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    total: int = 0
    sum_s: float = 0.0
    max_s: float = 0.0  # the longest pass since the last report

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total += 1
        self.sum_s += seconds
        self.max_s = max(self.max_s, seconds)

    def payload(self) -> bytes:
        cumulative, running = [], 0
        for n in self.counts[:-1]:
            running += n
            cumulative.append(running)
        return orjson.dumps({"buckets": list(BUCKETS_S), "cumulative": cumulative,
                             "count": self.total, "sum": self.sum_s, "max": self.max_s})

    def publish(self, client: redis.Redis, keys: Keys, me: str) -> None:
        """Write the figures (one round trip) and start a new window for `max`."""
        now = now_ms()
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.scheduler_loop(me), self.payload(), ex=TTL_S)
        pipe.zadd(keys.schedulers(), {me: now})
        pipe.zremrangebyscore(keys.schedulers(), "-inf", now - FORGET_MS)
        pipe.execute()
        self.max_s = 0.0
