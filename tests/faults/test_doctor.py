"""`tidal doctor` against a real server and a real SQLite mirror: each inconsistency is
made by hand, found, and repaired; `--restore` rebuilds unfinished jobs after Redis lost
everything (RELIABILITY.md I5, I6, F18)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlmodel import Session

from common import scripts as sc
from common.db import make_engine
from common.doctor import Doctor
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from common.tables import JobRecord
from scheduler.recorder import Recorder
from scheduler.service import Scheduler

pytestmark = pytest.mark.fault


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    e = make_engine(settings)
    try:
        yield e
    finally:
        e.dispose()


@pytest.fixture
def doctor(r: redis.Redis, keys: Keys, settings: Settings, engine: Engine) -> Doctor:
    return Doctor(r, keys, settings, engine, Recorder(settings, r, engine).catch_up)


def submit(r: redis.Redis, keys: Keys, **spec: Any) -> str:
    job_id = new_job_id()
    sub = JobSubmission.model_validate({"command": ["true"], **spec})
    reply = sc.Scripts(r).run(sc.submit(keys, job_id, "alice", submission_fields(sub),
                                        events_maxlen=10_000))
    assert int(reply[0]) == 1
    return job_id


def schedule(settings: Settings, r: redis.Redis, slots: int = 0) -> Scheduler:
    """Admit what was submitted (and dispatch up to `slots`) with one scheduler pass."""
    s = Scheduler(settings.model_copy(update={"capacity_refresh_s": 0.0, "recorder": False}),
                  client=r)
    s.duties.ensure_groups()
    if slots:
        sc.Scripts(r).run(sc.heartbeat(s.ctx.keys, "w-doctor", [], {"queues": "default",
                                                                     "slots": slots},
                                       ttl_ms=60_000))
    s.step(block_ms=None)
    return s


def checks(found: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in found:
        out.setdefault(f.check, set()).add(f.subject)
    return out


def test_a_consistent_cluster_has_no_findings(r: redis.Redis, keys: Keys, settings: Settings,
                                              doctor: Doctor) -> None:
    submit(r, keys)
    schedule(settings, r)
    assert doctor.repair(doctor.examine()) > 0  # the recorder's catch-up
    assert doctor.examine() == []


def test_redis_inconsistencies_are_found_and_fixed(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor
) -> None:
    queued, lost_entry, terminal = (submit(r, keys) for _ in range(3))
    schedule(settings, r, slots=2)  # two dispatched, one queued
    states = {j: r.hget(keys.job(j), "state") for j in (queued, lost_entry, terminal)}
    dispatched = sorted(j for j, s in states.items() if s == "dispatched")
    [queued] = [j for j, s in states.items() if s == "queued"]
    lost_entry, terminal = dispatched
    score = r.zscore(keys.queue("default"), queued)
    r.zrem(keys.queue("default"), queued)  # queued, but in no structure
    entry = r.hget(keys.job(lost_entry), "dispatch_id")
    r.xdel(keys.dispatch("default"), entry)  # dispatched, but its entry is gone
    r.hset(keys.job(terminal), "state", "completed")  # finished, but its entry lingers
    r.zadd(keys.workers(), {"ghost": 1})  # registered, but no heartbeat hash
    found = checks(doctor.examine())
    assert found["queued_orphan"] == {queued}
    assert found["dispatched_no_entry"] == {lost_entry}
    assert found["stale_dispatch_entry"] == {terminal}
    assert "ghost" in found["registry_orphan"]
    assert doctor.repair(doctor.examine()) >= 4
    assert r.zscore(keys.queue("default"), queued) == score  # its old place in line
    assert r.hget(keys.job(lost_entry), "state") == "queued"
    assert r.xlen(keys.dispatch("default")) == 0
    assert r.zscore(keys.workers(), "ghost") is None
    assert checks(doctor.examine()).keys() <= {"registry_orphan"}  # the fake worker's ttl


def test_dead_consumer_and_running_without_entry_are_reported(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor
) -> None:
    job = submit(r, keys)
    schedule(settings, r, slots=1)
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "dead-worker", {keys.dispatch("default"): ">"})
    [(entry, _)] = items
    sc.Scripts(r).run(sc.start(keys, "default", [(entry, job)], worker="dead-worker",
                               events_maxlen=10_000))
    found = checks(doctor.examine())
    assert found["dead_consumer"] == {"dead-worker"}
    r.xack(keys.dispatch("default"), GROUP_WORKERS, entry)  # a stale worker's plain XACK
    assert checks(doctor.examine())["running_no_entry"] == {job}


def test_mirror_differences_are_found_and_caught_up(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor, engine: Engine
) -> None:
    job = submit(r, keys)
    found = checks(doctor.examine())
    assert found["mirror_missing"] == {job} and "recorder_behind" in found
    doctor.repair(doctor.examine())
    with Session(engine) as s:
        row = s.get(JobRecord, job)
        assert row is not None
        row.state = "completed"  # the mirror says something else at the same event
        s.add(row)
        s.commit()
    assert checks(doctor.examine()) == {"mirror_differs": {job}}
    schedule(settings, r)  # a new event: the mirror is behind until it catches up
    assert checks(doctor.examine()) == {"mirror_behind": {job}, "recorder_behind":
                                        {keys.events()}}
    doctor.repair(doctor.examine())
    assert doctor.examine() == []


def test_restore_after_redis_lost_everything(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor, engine: Engine,
    prefix: str,
) -> None:
    done = submit(r, keys)
    waiting = submit(r, keys, priority="high")
    child = submit(r, keys, depends_on=[done])
    schedule(settings, r)
    r.hset(keys.job(done), mapping={"state": "completed", "attempt": "1"})  # as if it ran
    doctor.repair(doctor.examine())
    r.hset(keys.job(done), "seq", 99)  # its terminal event, recorded:
    with Session(engine) as s:
        row = s.get(JobRecord, done)
        assert row is not None
        row.state, row.seq = "completed", 99
        s.add(row)
        s.commit()
    seq_before = {j: int(r.hget(keys.job(j), "seq") or 0) for j in (waiting, child)}
    created = {j: r.hget(keys.job(j), "created_at") for j in (waiting, child)}
    for key in r.scan_iter(match=f"{prefix}*", count=1000):  # Redis loses everything
        r.delete(key)
    assert checks(doctor.examine())["lost_from_redis"] == {waiting, child}
    report = doctor.restore()
    assert (report.candidates, report.restored, report.present) == (2, 2, 0)
    assert doctor.restore().restored == 0  # idempotent: a second run changes nothing
    for job in (waiting, child):
        h = r.hgetall(keys.job(job))
        assert h["state"] == "pending" and h["created_at"] == created[job]
        assert int(h["seq"]) == seq_before[job] + 1  # the history goes on, not restarts
    ids = [f["id"] for _, f in r.xrange(keys.submissions())]
    assert ids == [waiting, child]
    assert r.xinfo_groups(keys.submissions())[0]["name"] == GROUP_SCHEDULERS
    schedule(settings, r)
    # `done` completed before the loss: the child does not wait for a hash that is gone
    assert r.hget(keys.job(child), "state") == "queued"
    doctor.repair(doctor.examine())
    with Session(engine) as s:
        restored = s.get(JobRecord, waiting)
        assert restored is not None and restored.state == "queued"


def test_orphans_of_a_host_and_a_retry_go_back_where_they_wait(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor
) -> None:
    holder, waiter = submit(r, keys, host="hv1"), submit(r, keys, host="hv1")
    retried = submit(r, keys)
    schedule(settings, r)
    assert r.get(keys.host("hv1")) == holder and r.zscore(keys.hostwait("hv1"), waiter)
    order = r.zscore(keys.hostwait("hv1"), waiter)
    r.zrem(keys.hostwait("hv1"), waiter)
    r.zrem(keys.queue("default"), retried)
    r.hset(keys.job(retried), mapping={"state": "retrying", "retry_at": 123})
    found = checks(doctor.examine())
    assert (found["queued_orphan"], found["retrying_orphan"]) == ({waiter}, {retried})
    doctor.repair(doctor.examine())
    assert r.zscore(keys.hostwait("hv1"), waiter) == order  # behind the holder, in order
    assert r.zscore(keys.queue("default"), waiter) is None
    assert r.zscore(keys.delayed(), retried) == 123
    assert not {"queued_orphan", "retrying_orphan"} & checks(doctor.examine()).keys()


def test_a_host_held_by_a_job_that_ended_is_handed_on(
    r: redis.Redis, keys: Keys, settings: Settings, doctor: Doctor
) -> None:
    holder, waiter = submit(r, keys, host="hv9"), submit(r, keys, host="hv9")
    schedule(settings, r)
    assert r.get(keys.host("hv9")) == holder
    # the holder ends but its settle entry is lost: the host would stay blocked
    r.hset(keys.job(holder), "state", "failed")
    r.delete(keys.settle())
    found = checks(doctor.examine())
    assert found["host_orphan"] == {"hv9"}
    assert doctor.repair(doctor.examine()) >= 1
    assert r.get(keys.host("hv9")) == waiter
    assert r.zscore(keys.queue("default"), waiter) is not None
    assert "host_orphan" not in checks(doctor.examine())
