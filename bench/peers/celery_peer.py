"""Celery (redis broker): enqueue with task.delay (no result backend, so no
SUBSCRIBE per task); worker pool `solo` (concurrency 1) or `threads`; latency: a redis
result backend and AsyncResult.get (pub/sub)."""

from __future__ import annotations

import sys

import _common
from celery import Celery

LATENCY = "latency" in sys.argv or "--latency" in sys.argv
URL = sys.argv[sys.argv.index("--url") + 1]

app = Celery("celery_peer", broker=URL, backend=URL if LATENCY else None)
app.conf.update(
    task_ignore_result=not LATENCY,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
)


@app.task(name="noop")
def noop() -> None:
    _common.hit()


def main() -> None:
    a = _common.args()
    if a.mode == "enqueue":
        _common.timed_enqueue(a.n, noop.delay)
    elif a.mode == "latency":
        _common.latency_loop(a.n, lambda: noop.delay().get(timeout=10))
    else:
        _common.start_reporter(a.url)
        pool = "solo" if a.concurrency <= 1 else "threads"
        app.worker_main(["worker", f"--pool={pool}", f"--concurrency={max(1, a.concurrency)}",
                         "--loglevel=WARNING", "--without-heartbeat", "--without-gossip",
                         "--without-mingle"])


if __name__ == "__main__":
    main()
