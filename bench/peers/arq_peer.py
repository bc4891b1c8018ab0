"""arq: enqueue with ArqRedis.enqueue_job; worker = arq.worker.Worker (max_jobs = the
concurrency); latency: worker poll_delay 5 ms and Job.result(poll_delay=2 ms) (tuned)."""

from __future__ import annotations

import asyncio

import _common
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker


async def noop(ctx: dict) -> None:
    _common.hit()


async def enqueue(a) -> None:  # type: ignore[no-untyped-def]
    pool = await create_pool(RedisSettings.from_dsn(a.url))
    import time
    t0 = time.perf_counter()
    for _ in range(a.n):
        await pool.enqueue_job("noop")
    _common.emit(jobs=a.n, seconds=time.perf_counter() - t0)
    await pool.aclose()


async def latency(a) -> None:  # type: ignore[no-untyped-def]
    import time
    pool = await create_pool(RedisSettings.from_dsn(a.url))

    async def one() -> None:
        job = await pool.enqueue_job("noop")
        await job.result(timeout=10, poll_delay=0.002)

    for _ in range(5):
        await one()
    samples = []
    for _ in range(a.n):
        t0 = time.perf_counter()
        await one()
        samples.append((time.perf_counter() - t0) * 1000)
    _common.emit(samples_ms=samples)
    await pool.aclose()


def main() -> None:
    a = _common.args()
    if a.mode == "enqueue":
        asyncio.run(enqueue(a))
    elif a.mode == "latency":
        asyncio.run(latency(a))
    else:
        _common.start_reporter(a.url)
        Worker(functions=[noop], redis_settings=RedisSettings.from_dsn(a.url),
               max_jobs=a.concurrency, poll_delay=0.005 if a.latency else 0.5,
               handle_signals=True).run()


if __name__ == "__main__":
    main()
