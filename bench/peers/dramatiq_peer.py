"""Dramatiq (RedisBroker): enqueue with actor.send; worker = dramatiq.Worker with
`worker_threads` = the concurrency; latency: the Results middleware (RedisBackend) and
Message.get_result(block=True) (BRPOPLPUSH)."""

from __future__ import annotations

import signal
import sys
import threading

import _common
import dramatiq
from dramatiq.brokers.redis import RedisBroker

LATENCY = "latency" in sys.argv or "--latency" in sys.argv
URL = sys.argv[sys.argv.index("--url") + 1]

broker = RedisBroker(url=URL)
if LATENCY:
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend
    broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0, **({"store_results": True} if LATENCY else {}))
def noop() -> None:
    _common.hit()


def main() -> None:
    a = _common.args()
    if a.mode == "enqueue":
        _common.timed_enqueue(a.n, noop.send)
    elif a.mode == "latency":
        _common.latency_loop(a.n, lambda: noop.send().get_result(block=True, timeout=10_000))
    else:
        _common.start_reporter(a.url)
        worker = dramatiq.Worker(broker, worker_threads=a.concurrency)
        worker.start()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        worker.stop()


if __name__ == "__main__":
    main()
