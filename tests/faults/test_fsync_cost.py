"""What durability costs: submit.lua (the write behind every 202) under the fsync policy
`tidal up` ships (AOF, `appendfsync always`), under `appendfsync everysec`, and under
everysec plus `WAITAOF 1 0 0` before answering. Prints figures, asserts no timing
(docs/reliability.md quotes them)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest
import redis

from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import Keys
from common.models import JobSubmission
from common.redis import connect
from common.valkey import start_server
from tests.faults.conftest import figures

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SEQUENTIAL = 400  # one client, one submit after the other: latency
THREADS, SECONDS = 8, 1.5  # concurrent clients: throughput
FIELDS = submission_fields(JobSubmission(command=["true"]))


def submit_once(client: redis.Redis, scripts: sc.Scripts, keys: Keys, wait_aof: bool) -> None:
    scripts.run(sc.submit(keys, new_job_id(), "bench", FIELDS, events_maxlen=1_000_000))
    if wait_aof:  # block until this write is fsynced to the local AOF
        client.execute_command("WAITAOF", 1, 0, 0)


def measure(url: str, wait_aof: bool) -> dict[str, float]:
    keys = Keys()
    client = connect(url)
    scripts = sc.Scripts(client)
    latencies = []
    for _ in range(SEQUENTIAL):
        started = time.perf_counter()
        submit_once(client, scripts, keys, wait_aof)
        latencies.append((time.perf_counter() - started) * 1000)
    done = [0] * THREADS
    deadline = time.perf_counter() + SECONDS

    def load(i: int) -> None:
        own = connect(url)
        own_scripts = sc.Scripts(own)
        while time.perf_counter() < deadline:
            submit_once(own, own_scripts, keys, wait_aof)
            done[i] += 1
        own.close()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    latencies.sort()
    return {"p50_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
            "per_s": sum(done) / SECONDS}


@pytest.mark.timeout(120)
def test_fsync_cost(tmp_path: Path) -> None:
    results = {}
    for name, fsync, wait_aof in (("always (shipped)", "always", False),
                                  ("everysec", "everysec", False),
                                  ("everysec + WAITAOF 1 0", "everysec", True)):
        proc, url = start_server(tmp_path / fsync / str(wait_aof), aof=True, fsync=fsync)
        try:
            results[name] = measure(url, wait_aof)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        figures(f"fsync cost: {name}", **results[name])
    assert all(r["per_s"] > 0 for r in results.values())
