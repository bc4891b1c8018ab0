"""Submit throughput through the API (no scheduler, no worker running; the prefix is
emptied between runs): the SDK one job at a time, the SDK in batches of 1,000
(`submit_many`), and a raw httpx POST of a pre-serialized JSON list of 1,000."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from bench.env import Tidal, per_job

NOOP = {"kind": "python", "function": "common.tasks:noop"}
BATCH = 1000


def _sdk_one(t: Tidal, n: int) -> None:
    with t.client() as c:
        for _ in range(n):
            c.submit(NOOP)


def _sdk_batch(t: Tidal, n: int) -> None:
    with t.client() as c:
        for start in range(0, n, BATCH):
            c.submit_many([NOOP] * min(BATCH, n - start))


def rest_batches(t: Tidal, n: int, job: dict[str, Any] = NOOP,
                 http: httpx.Client | None = None, ids: list[str] | None = None) -> None:
    """POST /jobs with JSON lists of up to 1,000 jobs, sequentially, on one connection
    (the accepted ids are appended to `ids` when given)."""
    own = http is None
    http = http or httpx.Client(base_url=t.url, timeout=120.0,
                                headers={"Authorization": f"Bearer {t.token}",
                                         "Content-Type": "application/json"})
    body = orjson.dumps([job] * BATCH)
    try:
        for start in range(0, n, BATCH):
            k = min(BATCH, n - start)
            r = http.post("/jobs", content=body if k == BATCH else orjson.dumps([job] * k))
            if r.status_code != 202:
                raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text[:300]}")
            if ids is not None:
                ids.extend(j["id"] for j in orjson.loads(r.content)["jobs"])
    finally:
        if own:
            http.close()


MODES = {"sdk_one": _sdk_one, "sdk_batch": _sdk_batch, "rest_batch": rest_batches}


def run_once(t: Tidal, mode: str, n: int) -> dict[str, Any]:
    t.flush_prefix()
    before = t.valkey.snapshot(t.pids())
    t0 = time.perf_counter()
    MODES[mode](t, n)
    elapsed = time.perf_counter() - t0
    after = t.valkey.snapshot(t.pids())
    # jobs written (submit.lua counts each on {tidal}:seq; a lone one is admitted
    # directly and leaves no submissions entry)
    got = int(t.r.get(t.keys.seq()) or 0)
    if got != n:
        raise RuntimeError(f"{mode}: {got} jobs written in Redis, expected {n}")
    out = {"jobs": n, "seconds": round(elapsed, 3), "jobs_per_s": round(n / elapsed, 1)}
    out.update(per_job(before, after, n))
    out["memory_bytes_per_pending_job"] = round((after.used_memory - before.used_memory) / n)
    return out
