"""Scheduler cost per job with many jobs already queued, measured in-process (the harness
runs this module as a child, `python -m bench.scale`, so it uses the same source tree as
the services).

For each size S (an empty database first): S no-op jobs written with pipelined submit.lua
calls and admitted by `scheduler.duties.Duties.admit`; Redis memory per queued job from
INFO used_memory. Then, `rounds` times: K fresh jobs are submitted (untimed), admitted
(timed), and K jobs dispatched from the big queue (timed) by `Duties.dispatch_all` with a
capacity of exactly K free slots. A variant fills with 10k distinct `host` values.
Prints one JSON document on stdout."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Any

import redis

from common import scripts as sc
from common.clock import monotonic
from common.jobs import submission_fields
from common.keys import Keys
from common.models import JobSubmission
from common.settings import Settings
from scheduler import duties as sd

PIPE = 1000


_FIELDS: dict[str | None, dict[str, Any]] = {}


def _fields(host: str | None) -> dict[str, Any]:
    """The job hash fields the API would write (cached per host)."""
    if host not in _FIELDS:
        sub = JobSubmission(kind="python", function="common.tasks:noop", host=host)
        _FIELDS[host] = dict(submission_fields(sub))
    return _FIELDS[host]


def _duties(settings: Settings, r: redis.Redis, scripts: sc.Scripts, keys: Keys) -> Any:
    """The scheduler's duties, for either shape of scheduler/duties.py (with or without a
    Context object)."""
    try:
        from scheduler.context import Context
    except ImportError:
        return sd.Duties(settings, r, scripts, keys, "sched-bench")  # type: ignore[call-arg]
    return sd.Duties(Context(settings, r, scripts, keys, "sched-bench"))


def _set_slots(duties: Any, slots: int) -> None:
    if hasattr(duties, "cluster"):
        duties.cluster = sd.Cluster({"default": sc.Capacity(slots=slots)}, monotonic())
    else:
        duties.capacity = sd.Capacity({"default": slots}, monotonic())


def flush(r: redis.Redis) -> None:
    """FLUSHDB SYNC, then wait for lazy frees, so used_memory deltas are real."""
    r.execute_command("FLUSHDB", "SYNC")
    while int(r.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.05)


class Bench:
    def __init__(self, url: str, hosts: int) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.settings = Settings(redis_url=url, prefix="{scale" + secrets.token_hex(2) + "}",
                                 capacity_refresh_s=1e9)
        self.keys = Keys(self.settings.prefix)
        self.scripts = sc.Scripts(self.r)
        self.duties = _duties(self.settings, self.r, self.scripts, self.keys)
        flush(self.r)
        self.duties.ensure_groups()
        self.hosts = hosts
        self.seq = 0

    def submit(self, n: int) -> None:
        owner = "bench"
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            self.seq += 1
            job_id = f"{self.seq:026d}"
            fields = _fields(f"h{self.seq % self.hosts}" if self.hosts else None)
            self.scripts.run(sc.submit(self.keys, job_id, owner, fields,
                                       events_maxlen=self.settings.events_maxlen), pipe)
            if (i + 1) % PIPE == 0:
                pipe.execute()
        pipe.execute()

    def admit_all(self) -> int:
        total = 0
        while n := self.duties.admit(block_ms=1):
            total += n
        return total

    def dispatch(self, k: int) -> int:
        sent = 0
        while sent < k:
            in_flight = self.r.xlen(self.keys.dispatch("default"))
            _set_slots(self.duties, in_flight + (k - sent))
            got = self.duties.dispatch_all()
            if not got:
                break
            sent += got
        return sent

    def counters(self) -> tuple[float, float, int, int]:
        info = self.r.info("all")
        return (time.perf_counter(), float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
                int(info["total_reads_processed"]), int(info["total_commands_processed"]))


def measure(url: str, size: int, k: int, rounds: int, hosts: int) -> dict[str, Any]:
    b = Bench(url, hosts)
    mem0 = int(b.r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    b.submit(size)
    admitted = b.admit_all()
    fill_s = time.perf_counter() - t0
    mem1 = int(b.r.info("memory")["used_memory"])
    events = int(b.r.memory_usage(b.keys.events()) or 0)
    queued = b.r.zcard(b.keys.queue("default"))
    out: dict[str, Any] = {
        "queued": queued, "admitted": admitted, "hosts": hosts, "fill_s": round(fill_s, 1),
        "bytes_per_queued_job": round((mem1 - mem0) / size),
        "bytes_per_queued_job_without_events": round((mem1 - mem0 - events) / size),
        "admit_us": [], "dispatch_us": [], "server_us": [], "python_us": [],
        "round_trips_per_job": [], "commands_per_job": [],
    }
    for _ in range(rounds):
        b.submit(k)
        c0, p0 = b.counters(), time.process_time()
        got = b.admit_all()
        c1 = b.counters()
        sent = b.dispatch(k)
        c2, p2 = b.counters(), time.process_time()
        if got != k or sent != k:
            out["warning"] = f"admitted {got}, dispatched {sent} of {k}"
        if not got or not sent:
            continue
        # per job admitted and per job dispatched (with hosts, only the host holders are
        # in the queue: a round may find fewer than k to dispatch)
        out["admit_us"].append((c1[0] - c0[0]) * 1e6 / got)
        out["dispatch_us"].append((c2[0] - c1[0]) * 1e6 / sent)
        out["server_us"].append((c2[1] - c0[1]) * 1e6 / max(got, sent))
        out["python_us"].append((p2 - p0) * 1e6 / max(got, sent))
        out["round_trips_per_job"].append((c2[2] - c0[2]) / max(got, sent))
        out["commands_per_job"].append((c2[3] - c0[3]) / max(got, sent))
    out["total_us"] = [a + d for a, d in zip(out["admit_us"], out["dispatch_us"], strict=True)]
    flush(b.r)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hosts-size", type=int, default=100_000)
    args = ap.parse_args()
    result: dict[str, Any] = {"k": args.k, "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        print(f"scale: {size} queued", file=sys.stderr, flush=True)
        result["sizes"][str(size)] = measure(args.url, size, args.k, args.rounds, 0)
    print(f"scale: {args.hosts_size} queued, 10k hosts", file=sys.stderr, flush=True)
    # one job per host is in the queue (the rest wait for their host): keep k small
    # enough that every round finds k host holders to dispatch
    k_hosts = min(args.k, 10_000 // (args.rounds + 1))
    result["hosts"] = measure(args.url, args.hosts_size, k_hosts, args.rounds, 10_000)
    result["hosts"]["k"] = k_hosts
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
