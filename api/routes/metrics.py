"""/metrics: Prometheus text format (prometheus-client), computed at scrape time.

No token is needed (like /healthz): the figures are aggregates by queue, state and
priority, with no job ids, users, commands or host names. Live figures are read from Redis
in a few pipelined round trips (api/routes/queues.py `cluster_view`); history (jobs by
state, the submitted/completed/failed counters and the wait and run time histograms) is
aggregated from the SQL mirror, at most once per MIRROR_CACHE_S per process, so scrapes
cost the hot path nothing. docs/live.md lists every metric and where it comes from.

Each scheduler publishes how long its loop passes take (scheduler/loopstats.py: a
histogram as JSON under a key with a short TTL, so a dead scheduler's figures lapse);
`tidal_scheduler_loop_seconds` exports it labelled by scheduler, read at scrape time.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, StateDep
from api.routes.queues import ClusterView, cluster_view
from common.clock import monotonic
from common.models import Priority, State
from common.tables import JobRecord

router = APIRouter(tags=["metrics"])

MIRROR_CACHE_S = 5.0
BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
             14400.0)


# -- history from the SQL mirror --------------------------------------------------------------


@dataclass
class Histogram:
    cumulative: list[int]  # jobs at or under each bound of BUCKETS_S
    count: int
    sum_s: float


@dataclass
class MirrorStats:
    jobs: list[tuple[str, str, int, int]]  # queue, state, priority, count
    wait: dict[str, Histogram] = field(default_factory=dict)
    run: dict[str, Histogram] = field(default_factory=dict)
    taken_at: float = 0.0  # monotonic


def _histogram_columns(span: Any) -> list[Any]:
    return [*(func.sum(case((span <= int(b * 1000), 1), else_=0)) for b in BUCKETS_S),
            func.sum(span)]


def _histogram(row: list[Any], count: int) -> Histogram:
    return Histogram([int(n or 0) for n in row[:-1]], count, float(row[-1] or 0) / 1000)


def mirror_stats(engine: Engine) -> MirrorStats:
    """Two grouped queries: jobs by (queue, state, priority); and, over finished jobs that
    ran, wait and run times by queue: the recorder's wait_ms (from when the job could first
    run, so a delayed start does not count as waiting) and run_ms, or for rows mirrored
    before those columns existed, started − created and finished − started."""
    created, started = col(JobRecord.created_at), col(JobRecord.started_at)
    finished = col(JobRecord.finished_at)
    counts = select(JobRecord.queue, JobRecord.state, JobRecord.priority, func.count()).group_by(
        JobRecord.queue, JobRecord.state, JobRecord.priority)
    times = (
        select(JobRecord.queue, func.count(),
               *_histogram_columns(func.coalesce(col(JobRecord.wait_ms), started - created)),
               *_histogram_columns(func.coalesce(col(JobRecord.run_ms), finished - started)))
        .where(created.is_not(None), started.is_not(None), finished.is_not(None))
        .group_by(JobRecord.queue)
    )
    n = len(BUCKETS_S) + 1
    with Session(engine) as session:
        stats = MirrorStats(jobs=[(q, s, int(p), int(c)) for q, s, p, c in session.exec(counts)])
        for queue, count, *rest in session.exec(times).all():
            stats.wait[queue] = _histogram(rest[:n], int(count))
            stats.run[queue] = _histogram(rest[n:], int(count))
    stats.taken_at = monotonic()
    return stats


_cache: weakref.WeakKeyDictionary[Engine, MirrorStats] = weakref.WeakKeyDictionary()


async def cached_mirror_stats(engine: Engine) -> MirrorStats:
    stats = _cache.get(engine)
    if stats is None or monotonic() - stats.taken_at >= MIRROR_CACHE_S:
        stats = await run_in_threadpool(mirror_stats, engine)
        _cache[engine] = stats
    return stats


# -- families ---------------------------------------------------------------------------------


def _gauge(name: str, doc: str, value: float | None = None,
           labels: list[str] | None = None) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value)
    return GaugeMetricFamily(name, doc, labels=labels)


def live_families(view: ClusterView) -> Iterator[Metric]:
    depth = _gauge("tidal_queue_depth", "Jobs in the queue waiting for a slot (live).",
                   labels=["queue"])
    flight = _gauge("tidal_jobs_in_flight", "Jobs dispatched or running (dispatch stream "
                    "length, live).", labels=["queue"])
    running = _gauge("tidal_jobs_running", "Jobs read by a worker and not finished (live).",
                     labels=["queue"])
    for name, q in view.queues.items():
        depth.add_metric([name], q.queued)
        flight.add_metric([name], q.in_flight)
        running.add_metric([name], q.running)
    yield from (depth, flight, running)
    yield _gauge("tidal_delayed_jobs", "Scheduled starts and retry back-offs (live).",
                 view.delayed)
    yield _gauge("tidal_workers", "Live workers.", len(view.workers))
    yield _gauge("tidal_worker_slots", "Job slots of the live workers.",
                 sum(w.slots for w in view.workers))
    yield _gauge("tidal_worker_slots_busy", "Slots of the live workers running a job.",
                 sum(len(w.running) for w in view.workers))
    yield _gauge("tidal_host_locks_held", "Hosts held by a job.", view.hosts_held)
    yield _gauge("tidal_host_waiters", "Jobs waiting for a busy host.", view.host_waiters)
    if view.recorder is not None:
        if view.recorder.lag is not None:
            yield _gauge("tidal_recorder_lag_entries", "Events the recorder has not read yet.",
                         view.recorder.lag)
        yield _gauge("tidal_recorder_pending_entries", "Events read by the recorder and not "
                     "yet committed to SQL.", view.recorder.pending)
        if view.recorder.seconds is not None:
            yield _gauge("tidal_recorder_lag_seconds", "Age of the oldest event the recorder "
                         "has not read (0 when up to date).", view.recorder.seconds)


def _histogram_family(name: str, doc: str, data: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["queue"])
    for queue, h in sorted(data.items()):
        buckets = [(floatToGoString(b), n) for b, n in zip(BUCKETS_S, h.cumulative, strict=True)]
        family.add_metric([queue], [*buckets, ("+Inf", h.count)], sum_value=h.sum_s)
    return family


def _priority(level: int) -> str:
    try:
        return Priority(level).label
    except ValueError:
        return str(level)


def mirror_families(stats: MirrorStats, now: float) -> Iterator[Metric]:
    jobs = _gauge("tidal_jobs", "Jobs by state (SQL mirror).",
                  labels=["queue", "state", "priority"])
    submitted = CounterMetricFamily("tidal_jobs_submitted", "Jobs submitted (SQL mirror).",
                                    labels=["queue"])
    completed = CounterMetricFamily("tidal_jobs_completed", "Jobs that completed (SQL mirror).",
                                    labels=["queue"])
    failed = CounterMetricFamily("tidal_jobs_failed", "Jobs that failed (SQL mirror).",
                                 labels=["queue"])
    per_queue: dict[str, dict[str, int]] = {}
    for queue, state, priority, count in stats.jobs:
        jobs.add_metric([queue, state, _priority(priority)], count)
        totals = per_queue.setdefault(queue, {})
        totals["all"] = totals.get("all", 0) + count
        totals[state] = totals.get(state, 0) + count
    for queue, totals in sorted(per_queue.items()):
        submitted.add_metric([queue], totals["all"])
        completed.add_metric([queue], totals.get(State.COMPLETED.value, 0))
        failed.add_metric([queue], totals.get(State.FAILED.value, 0))
    yield from (jobs, submitted, completed, failed)
    yield _histogram_family("tidal_job_wait_seconds", "Wait time of finished jobs: started − "
                            "when it could first run (SQL mirror).", stats.wait)
    yield _histogram_family("tidal_job_run_seconds", "Run time of finished jobs: finished − "
                            "started (SQL mirror).", stats.run)
    yield _gauge("tidal_metrics_mirror_age_seconds", "Age of the SQL figures in this scrape.",
                 max(0.0, now - stats.taken_at))


# -- the schedulers' loops (each publishes its own figures) -------------------------------------


@dataclass
class LoopFigures:
    scheduler: str
    buckets: list[float]  # upper bounds (s)
    cumulative: list[int]  # passes at or under each bound
    count: int
    sum_s: float
    max_s: float  # the longest pass in the scheduler's last report interval


async def scheduler_loops(ctx: AppState) -> list[LoopFigures]:
    """The loop figures of every scheduler whose entry has not lapsed (two round trips)."""
    ids = sorted(await ctx.redis.zrange(ctx.keys.schedulers(), 0, -1))
    if not ids:
        return []
    raw = await ctx.redis.mget([ctx.keys.scheduler_loop(i) for i in ids])
    out = []
    for scheduler, text in zip(ids, raw, strict=True):
        if not text:
            continue
        try:
            d = orjson.loads(text)
            out.append(LoopFigures(str(scheduler), [float(b) for b in d["buckets"]],
                                   [int(n) for n in d["cumulative"]], int(d["count"]),
                                   float(d["sum"]), float(d.get("max") or 0.0)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # not ours to fail a scrape over
    return out


def loop_families(loops: Iterable[LoopFigures]) -> Iterator[Metric]:
    hist = HistogramMetricFamily("tidal_scheduler_loop_seconds", "Duration of the scheduler's "
                                 "loop passes (admit, settle, dispatch, periodic duties; not the "
                                 "wait for work), per scheduler since it started.",
                                 labels=["scheduler"])
    longest = _gauge("tidal_scheduler_loop_max_seconds", "Longest loop pass of each scheduler "
                     "in its last report interval (about 1 s).", labels=["scheduler"])
    for f in loops:
        buckets = [(floatToGoString(b), n) for b, n in zip(f.buckets, f.cumulative, strict=True)]
        hist.add_metric([f.scheduler], [*buckets, ("+Inf", f.count)], sum_value=f.sum_s)
        longest.add_metric([f.scheduler], f.max_s)
    yield from (hist, longest)


class _Families(Collector):
    """A collector that hands out families computed beforehand (the reads are async)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@router.get("/metrics", summary="Prometheus metrics (no token needed)",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(ctx: StateDep) -> Response:
    view = await cluster_view(ctx)
    loops = await scheduler_loops(ctx)
    stats = await cached_mirror_stats(ctx.engine)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*live_families(view), *loop_families(loops),
                                 *mirror_families(stats, monotonic())]))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
