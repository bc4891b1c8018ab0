"""Shared by the peer scripts (run with a peer's own virtualenv, not Tidal's): a job
counter that the no-op task bumps, reported to Redis every 20 ms by a thread (one HSET,
not one round trip per job), and the command line every peer script takes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import redis

DONE_KEY = "bench:done"  # hash: pid -> "count first_ts last_ts"


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0
        self.first = 0.0
        self.last = 0.0

    def hit(self) -> None:
        now = time.time()
        with self.lock:
            self.n += 1
            if self.n == 1:
                self.first = now
            self.last = now

    def report_forever(self, url: str) -> None:
        r = redis.Redis.from_url(url)
        pid = str(os.getpid())
        while True:
            with self.lock:
                value = f"{self.n} {self.first} {self.last}"
            try:
                r.hset(DONE_KEY, pid, value)
            except redis.RedisError:
                pass
            time.sleep(0.02)


COUNTER = Counter()


def hit() -> None:
    COUNTER.hit()


def start_reporter(url: str) -> None:
    threading.Thread(target=COUNTER.report_forever, args=(url,), daemon=True).start()


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["enqueue", "worker", "latency"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bulk", action="store_true")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency", action="store_true", help="worker: tuned for latency")
    return ap.parse_args()


def emit(**fields: object) -> None:
    json.dump(fields, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def timed_enqueue(n: int, enqueue_one, bulk=None) -> None:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    if bulk is not None:
        for start in range(0, n, 1000):
            bulk(min(1000, n - start))
    else:
        for _ in range(n):
            enqueue_one()
    emit(jobs=n, seconds=time.perf_counter() - t0)


def latency_loop(n: int, one) -> None:  # type: ignore[no-untyped-def]
    """`one()` enqueues a job and returns when the client has seen it complete."""
    for _ in range(5):
        one()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        one()
        samples.append((time.perf_counter() - t0) * 1000)
    emit(samples_ms=samples)
