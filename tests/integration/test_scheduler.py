"""The scheduler's duties and the recorder against a real server and a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from sqlmodel import Session, select

from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from common.tables import EventRecord, JobRecord
from scheduler.recorder import Recorder
from scheduler.service import Scheduler
from tests.support import wait_for


def submit(r: redis.Redis, keys: Keys, settings: Settings, **kw: object) -> str:
    job_id = new_job_id()
    sub = JobSubmission.model_validate({"command": ["true"], **kw})
    sc.Scripts(r).run(sc.submit(keys, job_id, "alice", submission_fields(sub),
                                events_maxlen=settings.events_maxlen))
    return job_id


def fake_worker(r: redis.Redis, keys: Keys, worker_id: str, slots: int, queues: str = "default",
                ttl_ms: int = 10_000) -> None:
    sc.Scripts(r).run(sc.heartbeat(keys, worker_id, [], {"queues": queues, "slots": slots},
                                   ttl_ms=ttl_ms))


@contextmanager
def running(settings: Settings, **update: object) -> Iterator[Scheduler]:
    """A scheduler loop in a thread (capacity re-read at every pass), stopped after."""
    s = Scheduler(settings.model_copy(update={"capacity_refresh_s": 0.0, **update}))
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
def scheduler(settings: Settings) -> Iterator[Scheduler]:
    with running(settings) as s:
        yield s


def test_admits_and_dispatches_only_up_to_free_slots(
    r: redis.Redis, keys: Keys, settings: Settings, scheduler: Scheduler
) -> None:
    jobs = [submit(r, keys, settings, priority="low") for _ in range(3)]
    crit = submit(r, keys, settings, priority="critical")
    wait_for(lambda: r.zcard(keys.queue("default")) == 4, what="all four admitted")
    fake_worker(r, keys, "w1", slots=2)
    wait_for(lambda: r.xlen(keys.dispatch("default")) == 2, what="two dispatched")
    # the critical job went first, then the oldest low one; the rest wait in the queue
    dispatched = [f["id"] for _, f in r.xrange(keys.dispatch("default"))]
    assert dispatched == [crit, jobs[0]]
    assert r.zrange(keys.queue("default"), 0, -1) == jobs[1:]
    assert r.hget(keys.job(jobs[1]), "wait_reason") == "priority"


def test_dispatch_ahead_hands_out_that_fraction_more_than_the_free_slots(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """TIDAL_DISPATCH_AHEAD=1: two slots get four jobs, best first (the two beyond the
    slots wait in the dispatch stream for the first free slot); never more."""
    with running(settings, dispatch_ahead=1.0) as s:
        jobs = [submit(r, keys, settings, priority="low") for _ in range(5)]
        crit = submit(r, keys, settings, priority="critical")
        wait_for(lambda: r.zcard(keys.queue("default")) == 6, what="all six admitted")
        fake_worker(r, keys, "w1", slots=2)
        wait_for(lambda: r.xlen(keys.dispatch("default")) == 4, what="four dispatched")
        s.duties.dispatch_all()  # nothing more: the budget is spent
        assert [f["id"] for _, f in r.xrange(keys.dispatch("default"))] == [crit, *jobs[:3]]
        assert r.zrange(keys.queue("default"), 0, -1) == jobs[3:]


def test_publishes_each_queues_live_capacity_for_the_workers_dispatch(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """The capacity hash a worker's own dispatch reads: the live slots (with the
    dispatch-ahead budget) per queue, with a TTL so it outlives its scheduler by a worker
    TTL at most."""
    with running(settings, dispatch_ahead=0.5):
        fake_worker(r, keys, "w1", slots=2)
        fake_worker(r, keys, "w2", slots=4, queues="default,gpu")
        wait_for(lambda: r.hget(keys.capacity("gpu"), "slots") == "6", what="gpu published")
        assert r.hget(keys.capacity("default"), "slots") == "9"  # 6 + half of them
        assert 0 < r.pttl(keys.capacity("default")) <= settings.worker_ttl_s * 1000


def test_no_live_worker_means_nothing_dispatched(
    r: redis.Redis, keys: Keys, settings: Settings, scheduler: Scheduler
) -> None:
    job = submit(r, keys, settings)
    wait_for(lambda: r.hget(keys.job(job), "state") == "queued", what="admitted")
    fake_worker(r, keys, "w-other-queue", slots=4, queues="gpu")
    scheduler.duties.dispatch_all()
    assert r.xlen(keys.dispatch("default")) == 0
    fake_worker(r, keys, "w1", slots=1)
    wait_for(lambda: r.hget(keys.job(job), "state") == "dispatched", what="dispatched")


def test_delayed_start_is_promoted_when_due(
    r: redis.Redis, keys: Keys, settings: Settings, scheduler: Scheduler
) -> None:
    from datetime import UTC, datetime, timedelta

    fake_worker(r, keys, "w1", slots=1)
    at = datetime.now(UTC) + timedelta(milliseconds=400)
    job = submit(r, keys, settings, scheduled_at=at.isoformat())
    wait_for(lambda: r.hget(keys.job(job), "wait_reason") == "scheduled_at", what="delayed")
    assert r.zscore(keys.delayed(), job) is not None
    wait_for(lambda: r.hget(keys.job(job), "state") == "dispatched", timeout=5, what="due")


def test_submissions_left_by_a_dead_scheduler_are_admitted(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    from common.keys import GROUP_SCHEDULERS

    job = submit(r, keys, settings)
    ensure_group(r, keys.submissions(), GROUP_SCHEDULERS)
    r.xreadgroup(GROUP_SCHEDULERS, "dead", {keys.submissions(): ">"}, count=10)
    s = Scheduler(settings.model_copy(update={"reclaim_idle_s": 0.0}))
    assert s.duties.admit(block_ms=None) == 0  # nothing new to read
    assert s.duties.reclaim_submissions() == 1
    assert r.hget(keys.job(job), "state") == "queued"
    assert r.xpending(keys.submissions(), GROUP_SCHEDULERS)["pending"] == 0


def test_recorder_mirrors_jobs_and_events_idempotently(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    s = Scheduler(settings)
    s.duties.ensure_groups()
    job = submit(r, keys, settings, tags={"team": "infra"})
    s.duties.admit(block_ms=None)
    fake_worker(r, keys, "w1", slots=1)
    s.duties.dispatch_all()
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w1", {keys.dispatch("default"): ">"}, count=1)
    scripts = sc.Scripts(r)
    scripts.run(sc.start(keys, "default", [(items[0][0], job)], worker="w1", events_maxlen=1000))
    scripts.run(sc.finish(keys, job, "default", items[0][0], sc.Outcome("failed", 3, reason="x"),
                          worker="w1", retry_delay_ms=0, events_maxlen=1000, ttl_s=60))

    rec = Recorder(settings, r)
    assert rec.catch_up() == 5
    with Session(rec.engine) as db:
        row = db.get(JobRecord, job)
        assert row is not None
        assert (row.state, row.exit_code, row.attempt, row.owner) == ("failed", 3, 1, "alice")
        states = [e.state for e in db.exec(select(EventRecord).order_by(EventRecord.seq))]
        assert states == ["pending", "queued", "dispatched", "running", "failed"]

    # replaying every event changes nothing
    items = [(eid, f) for eid, f in r.xrange(keys.events())]
    rec.apply(items)
    with Session(rec.engine) as db:
        assert len(db.exec(select(EventRecord)).all()) == 5
        assert db.get(JobRecord, job).state == "failed"  # type: ignore[union-attr]


def test_recorder_uses_events_when_the_hash_expired(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    job = submit(r, keys, settings)
    rec = Recorder(settings, r)
    rec.catch_up()
    r.delete(keys.job(job))
    r.xadd(keys.events(), {"job": job, "seq": 7, "state": "cancelled", "at": 1, "by": "bob",
                           "reason": "cancelled"})
    rec.catch_up()
    with Session(rec.engine) as db:
        row = db.get(JobRecord, job)
        assert row is not None
        assert (row.state, row.reason, row.owner, row.seq) == ("cancelled", "cancelled", "alice", 7)


def _run_one(r: redis.Redis, keys: Keys, settings: Settings, s: Scheduler, worker: str,
             **kw: object) -> tuple[str, str]:
    """Submit, admit, dispatch and start one job on `worker`; returns (job id, entry id)."""
    job = submit(r, keys, settings, **kw)
    s.duties.admit(block_ms=None)
    fake_worker(r, keys, worker, slots=1, ttl_ms=60_000)
    s.duties.dispatch_all()
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, worker, {keys.dispatch("default"): ">"}, count=1)
    sc.Scripts(r).run(sc.start(keys, "default", [(items[0][0], job)], worker=worker,
                               events_maxlen=1000))
    return job, items[0][0]


def test_reaper_requeues_the_job_of_a_dead_worker_without_spending_a_retry(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    s = Scheduler(settings.model_copy(update={"capacity_refresh_s": 0.0}))
    s.duties.ensure_groups()
    job, entry = _run_one(r, keys, settings, s, "w-dead")
    assert s.duties.reap() == 0  # its heartbeat is alive: nothing to do
    r.delete(keys.worker("w-dead"))  # the heartbeat expired
    assert s.duties.reap() == 1
    h = r.hgetall(keys.job(job))
    assert (h["state"], h["lost"], h["attempt"]) == ("queued", "1", "1")
    assert r.zrange(keys.queue("default"), 0, -1) == [job]
    assert r.xlen(keys.dispatch("default")) == 0
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0
    # the stale worker's finish is refused (its token is gone)
    out = sc.Scripts(r).run(sc.finish(keys, job, "default", entry, sc.Outcome("completed", 0),
                                      worker="w-dead", retry_delay_ms=0, events_maxlen=100,
                                      ttl_s=60))
    assert out == -1
    # the next reap deletes the dead consumer, whose pending list is now empty
    s.duties.reap()
    consumers = {c["name"] for c in r.xinfo_consumers(keys.dispatch("default"), GROUP_WORKERS)}
    assert "w-dead" not in consumers


def test_a_job_lost_too_often_fails_as_poison(
    r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    s = Scheduler(settings.model_copy(update={"capacity_refresh_s": 0.0, "max_deliveries": 1}))
    s.duties.ensure_groups()
    job, _ = _run_one(r, keys, settings, s, "w-a")
    r.delete(keys.worker("w-a"))
    s.duties.reap()
    assert r.hget(keys.job(job), "state") == "queued"
    fake_worker(r, keys, "w-b", slots=1, ttl_ms=60_000)
    s.duties.dispatch_all()
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w-b", {keys.dispatch("default"): ">"}, count=1)
    sc.Scripts(r).run(sc.start(keys, "default", [(items[0][0], job)], worker="w-b",
                               events_maxlen=1000))
    r.delete(keys.worker("w-b"))
    s.duties.reap()
    h = r.hgetall(keys.job(job))
    assert (h["state"], h["reason"]) == ("failed", "poison")
