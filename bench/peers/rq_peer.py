"""RQ: enqueue with Queue.enqueue (bulk: enqueue_many in pipelines of 1,000); worker =
SimpleWorker (no fork per job); latency: Job.latest_result(timeout) (a blocking read)."""

from __future__ import annotations

import _common
import redis
from rq import Queue, SimpleWorker


def noop() -> None:
    _common.hit()


def main() -> None:
    a = _common.args()
    r = redis.Redis.from_url(a.url)
    q = Queue("bench", connection=r)
    if a.mode == "enqueue":
        def bulk(k: int) -> None:
            with r.pipeline() as pipe:
                q.enqueue_many([Queue.prepare_data("rq_peer.noop") for _ in range(k)],
                               pipeline=pipe)
                pipe.execute()
        _common.timed_enqueue(a.n, lambda: q.enqueue("rq_peer.noop"),
                              bulk if a.bulk else None)
    elif a.mode == "latency":
        def one() -> None:
            job = q.enqueue("rq_peer.noop")
            if job.latest_result(timeout=10) is None:
                raise RuntimeError("no result")
        _common.latency_loop(a.n, one)
    else:
        _common.start_reporter(a.url)
        SimpleWorker([q], connection=r).work(logging_level="WARNING")


if __name__ == "__main__":
    main()
