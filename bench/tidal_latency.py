"""Idle latency: sequential no-op jobs, submit → completion seen by the client.

Four ways of seeing completion:
- `run` (the headline, like the peers' own push-based waits): the SDK's `run`, one
  `POST /jobs?wait=` that answers once the job finished;
- `wait`: the SDK's `submit`, then its `wait` (long-polls of
  `GET /jobs/{id}?wait=&until=finished`): two requests;
- `poll`: `GET /jobs/{id}` in a loop with a 0.5 ms pause until the state is terminal
  (each poll costs the API CPU that the scheduler and worker then lack on 2 cores);
- `sse`: `GET /jobs/{id}/logs?follow=true` until its `end` event (what `tidal submit
  --follow` uses), on fewer jobs.
Each job's own timestamps (Redis clock, ms) split the time into hops: created → admitted
→ dispatched → started → finished."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.env import TERMINAL, Tidal
from bench.stats import percentiles
from bench.tidal_submit import NOOP
from common.client import Client
from common.models import Job

HOPS = ("admitted_at", "dispatched_at", "started_at", "finished_at")


def _hops(t: Tidal, job_ids: list[str]) -> dict[str, float]:
    pipe = t.r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(t.keys.job(job_id), "created_at", *HOPS)
    per: dict[str, list[int]] = {h: [] for h in HOPS}
    for row in pipe.execute():
        if None in row:
            continue
        vals = [int(v) for v in row]
        for i, name in enumerate(HOPS):
            per[name].append(vals[i + 1] - vals[i])
    names = {"admitted_at": "submit→admit", "dispatched_at": "admit→dispatch",
             "started_at": "dispatch→start", "finished_at": "start→finish"}
    return {names[h]: round(statistics.median(v), 2) for h, v in per.items() if v}


def _sequential(t: Tidal, n: int, mode: str, one: Callable[[Client], Job]) -> dict[str, Any]:
    """n jobs one after another, each timed from submit to its finished document."""
    samples: list[float] = []
    ids: list[str] = []
    with t.client() as c:
        for _ in range(min(5, n)):  # warm-up: connections, script caches
            one(c)
        for _ in range(n):
            t0 = time.perf_counter()
            done = one(c)
            samples.append((time.perf_counter() - t0) * 1000)
            assert done.state.terminal
            ids.append(done.id)
    out: dict[str, Any] = {"mode": mode, **percentiles(samples)}
    out["hops_ms_p50"] = _hops(t, ids)
    return out


def run_run(t: Tidal, n: int) -> dict[str, Any]:
    return _sequential(t, n, "SDK run (one request: POST /jobs?wait=)",
                       lambda c: c.run(NOOP, timeout=30))


def run_wait(t: Tidal, n: int) -> dict[str, Any]:
    return _sequential(t, n, "SDK submit + wait (long-poll GET /jobs/{id}?wait=)",
                       lambda c: c.wait(c.submit(NOOP).id, timeout=30))


def run_poll(t: Tidal, n: int) -> dict[str, Any]:
    samples: list[float] = []
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {t.token}"}
    with t.client() as c, httpx.Client(base_url=t.url, headers=headers, timeout=30) as http:
        for _ in range(min(5, n)):  # warm-up: connections, script caches
            job = c.submit(NOOP)
            while http.get(f"/jobs/{job.id}").json()["state"] not in TERMINAL:
                time.sleep(0.0005)
        for _ in range(n):
            t0 = time.perf_counter()
            job = c.submit(NOOP)
            while http.get(f"/jobs/{job.id}").json()["state"] not in TERMINAL:
                time.sleep(0.0005)
            samples.append((time.perf_counter() - t0) * 1000)
            ids.append(job.id)
    out: dict[str, Any] = {"mode": "poll GET /jobs/{id} every 0.5 ms", **percentiles(samples)}
    out["hops_ms_p50"] = _hops(t, ids)
    return out


def run_sse(t: Tidal, n: int) -> dict[str, Any]:
    samples: list[float] = []
    headers = {"Authorization": f"Bearer {t.token}", "Accept": "text/event-stream"}
    with t.client() as c, httpx.Client(base_url=t.url, headers=headers, timeout=30) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            job = c.submit(NOOP)
            with http.stream("GET", f"/jobs/{job.id}/logs", params={"follow": "true"}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: end"):
                        break
            samples.append((time.perf_counter() - t0) * 1000)
    return {"mode": "SSE /jobs/{id}/logs?follow=true until `end`", **percentiles(samples)}
