"""Scheduler cost per job with many jobs already queued, measured in-process (the harness
runs this module as a child, `python -m bench.scale`, so it uses the same source tree as
the services).

For each size S (an empty database first): S no-op jobs written with pipelined submit.lua
calls and admitted by `scheduler.duties.Duties.admit`; Redis memory per queued job from
INFO used_memory. Then, `rounds` times: K fresh jobs are submitted (untimed), admitted
(timed), and K jobs dispatched from the big queue (timed) by `Duties.dispatch_all` with a
capacity of exactly K free slots. A variant fills with 10k distinct `host` values; as
only one job per host is in the queue there, its K is smaller (2,500), so the plain case
is measured once more at that K (`hosts_baseline`): a per-round cost that does not
depend on the jobs would otherwise weigh twice as much per job in the host case.

What the timed window holds is only the scheduler's own work. Two things it once held
that were not: (1) admission ended with an XREADGROUP BLOCK 1 ms on the emptied stream,
and a blocked read's timeout is only noticed on the server's hz tick (~100 ms at hz 10,
bench/phases.py `block_timeout_ms`): ~20 µs per job at K = 5,000 and ~40 at 2,500, idle
time the real scheduler never spends while it has work (it reads ahead without
blocking); (2) an XLEN per dispatch call made by the bench itself to size the free
slots, which the bench can count on its own (nothing consumes the dispatch stream).
All cases are filled first, each in its own database (the one of --url, then the next
ones), so a small case's keys are not looked up among a big one's; then their rounds take
turns, so a change of load on a shared machine weighs on each case alike.
Prints one JSON document on stdout."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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


def db_url(url: str, db: int) -> str:
    """The same server's URL for another database (the path is the database number)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def flush(r: redis.Redis) -> None:
    """FLUSHDB SYNC, then wait for lazy frees, so used_memory deltas are real."""
    r.execute_command("FLUSHDB", "SYNC")
    while int(r.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.05)


class Bench:
    def __init__(self, url: str, hosts: int) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.settings = Settings(redis_url=url, prefix="{scale" + secrets.token_hex(4) + "}",
                                 capacity_refresh_s=1e9)
        self.keys = Keys(self.settings.prefix)
        self.scripts = sc.Scripts(self.r)
        self.duties = _duties(self.settings, self.r, self.scripts, self.keys)
        self.duties.ensure_groups()
        self.hosts = hosts
        self.seq = 0
        self.in_flight = 0  # jobs in the dispatch stream

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

    def admit_all(self, expected: int) -> int:
        """Admit the `expected` jobs just submitted. Each read finds entries waiting, so it
        returns at once; the loop stops when all are admitted instead of reading the
        emptied stream, whose BLOCK would end only on the server's next hz tick (~100 ms
        of idle time, not the scheduler's cost). Works with any tree's `Duties.admit`
        (`--source git:REV` runs this harness against older services)."""
        total = 0
        while total < expected:
            n = self.duties.admit(block_ms=1)
            if not n:
                break
            total += n
        return total

    def dispatch(self, k: int) -> int:
        """Dispatch k jobs with exactly k free slots. The jobs in flight are counted here
        (nothing reads the dispatch stream), not asked of the server, so the timed window
        holds only the scheduler's round trips."""
        sent = 0
        while sent < k:
            _set_slots(self.duties, self.in_flight + (k - sent))
            got = self.duties.dispatch_all()
            if not got:
                break
            sent += got
            self.in_flight += got
        return sent

    def counters(self) -> tuple[float, float, int, int]:
        info = self.r.info("all")
        return (time.perf_counter(), float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
                int(info["total_reads_processed"]), int(info["total_commands_processed"]))


class Case:
    """One measured shape: a filled queue (its own key prefix) and the timed rounds run on it."""

    def __init__(self, url: str, size: int, k: int, hosts: int) -> None:
        self.b, self.size, self.k = Bench(url, hosts), size, k
        b = self.b
        mem0 = int(b.r.info("memory")["used_memory"])
        t0 = time.perf_counter()
        b.submit(size)
        admitted = b.admit_all(size)
        fill_s = time.perf_counter() - t0
        mem1 = int(b.r.info("memory")["used_memory"])
        events = int(b.r.memory_usage(b.keys.events()) or 0)
        self.out: dict[str, Any] = {
            "queued": b.r.zcard(b.keys.queue("default")), "admitted": admitted, "hosts": hosts,
            "k": k, "fill_s": round(fill_s, 1),
            "bytes_per_queued_job": round((mem1 - mem0) / size),
            "bytes_per_queued_job_without_events": round((mem1 - mem0 - events) / size),
            "admit_us": [], "dispatch_us": [], "server_us": [], "python_us": [],
            "admit_server_us": [], "dispatch_server_us": [],
            "admit_python_us": [], "dispatch_python_us": [],
            "round_trips_per_job": [], "commands_per_job": [],
        }

    def round(self) -> None:
        """k fresh jobs submitted (untimed), admitted and k dispatched (timed)."""
        b, k, out = self.b, self.k, self.out
        b.submit(k)
        c0, p0 = b.counters(), time.process_time()
        got = b.admit_all(k)
        c1, p1 = b.counters(), time.process_time()
        sent = b.dispatch(k)
        c2, p2 = b.counters(), time.process_time()
        if got != k or sent != k:
            out["warning"] = f"admitted {got}, dispatched {sent} of {k}"
        if not got or not sent:
            return
        # per job admitted and per job dispatched (with hosts, only the host holders are
        # in the queue: a round may find fewer than k to dispatch)
        n = max(got, sent)
        out["admit_us"].append((c1[0] - c0[0]) * 1e6 / got)
        out["dispatch_us"].append((c2[0] - c1[0]) * 1e6 / sent)
        out["server_us"].append((c2[1] - c0[1]) * 1e6 / n)
        out["python_us"].append((p2 - p0) * 1e6 / n)
        out["admit_server_us"].append((c1[1] - c0[1]) * 1e6 / got)
        out["dispatch_server_us"].append((c2[1] - c1[1]) * 1e6 / sent)
        out["admit_python_us"].append((p1 - p0) * 1e6 / got)
        out["dispatch_python_us"].append((p2 - p1) * 1e6 / sent)
        out["round_trips_per_job"].append((c2[2] - c0[2]) / n)
        out["commands_per_job"].append((c2[3] - c0[3]) / n)

    def result(self) -> dict[str, Any]:
        out = self.out
        out["total_us"] = [a + d for a, d in zip(out["admit_us"], out["dispatch_us"],
                                                 strict=True)]
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--sizes", default="1000,100000,1000000",
                    help="comma-separated queue sizes without hosts ('' for none)")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hosts-size", type=int, default=100_000, help="0: no host variant")
    args = ap.parse_args()
    base = int(redis.Redis.from_url(args.url).connection_pool.connection_kwargs.get("db", 0))
    shapes: list[tuple[str, int, int, int]] = [
        (s, int(s), args.k, 0) for s in args.sizes.split(",") if s]
    if args.hosts_size:
        # one job per host is in the queue (the rest wait for their host): keep k small
        # enough that every round finds k host holders to dispatch
        k_hosts = min(args.k, 10_000 // (args.rounds + 1))
        shapes.append(("hosts", args.hosts_size, k_hosts, 10_000))
        # like with like: the plain case at the host case's k
        shapes.append(("hosts_baseline", 1000, k_hosts, 0))
    urls = [db_url(args.url, base + i) for i in range(len(shapes))]
    for url in urls:
        flush(redis.Redis.from_url(url))
    cases: dict[str, Case] = {}
    for (label, size, k, hosts), url in zip(shapes, urls, strict=True):
        print(f"scale: fill {size} queued{', 10k hosts' if hosts else ''}, k {k}",
              file=sys.stderr, flush=True)
        cases[label] = Case(url, size, k, hosts)
    # The rounds of all cases take turns (in a rotating order), so a change of load on a
    # shared machine falls on every case alike: the ratios between them are what counts.
    order = list(cases.values())
    for i in range(args.rounds):
        print(f"scale: round {i + 1} of every case", file=sys.stderr, flush=True)
        for case in order[i % len(order):] + order[:i % len(order)]:
            case.round()
    result: dict[str, Any] = {
        "k": args.k, "sizes": {label: c.result() for label, c in cases.items()
                               if label not in ("hosts", "hosts_baseline")}}
    for label in ("hosts", "hosts_baseline"):
        if label in cases:
            result[label] = cases[label].result()
    for url in urls:
        flush(redis.Redis.from_url(url))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
