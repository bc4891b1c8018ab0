"""Each scheduling rule of docs/scheduling.md, driven step by step through the real Lua
scripts and the scheduler's duties on a real server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis

from common.cron import next_fire_ms
from common.keys import Keys
from common.settings import Settings
from tests.integration.harness import Harness


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    return Harness(r, keys, settings)


# -- priorities -------------------------------------------------------------------------


def test_every_critical_job_starts_before_any_low_one_when_slots_are_busy(h: Harness) -> None:
    h.worker("w1", slots=2)
    busy = [h.submit(), h.submit()]
    h.step()
    assert sorted(h.take("w1")) == sorted(busy)
    lows = [h.submit(priority="low") for _ in range(3)]
    crits = [h.submit(priority="critical") for _ in range(3)]
    h.step()
    assert h.r.xlen(h.keys.dispatch("default")) == 2  # never more than the slots
    started: list[str] = []
    for job in busy:
        h.finish(job)
    while len(started) < 6:
        h.step()
        batch = h.take("w1")
        assert batch, "nothing dispatched although slots are free"
        started += batch
        for job in batch:
            h.finish(job)
    assert started[:3] == crits  # all critical ones first, in submission order
    assert started[3:] == lows


def test_equal_priorities_run_in_submission_order(h: Harness) -> None:
    jobs = [h.submit(priority="high") for _ in range(5)]
    h.step()
    h.worker("w1", slots=5)
    h.step()
    assert h.take("w1") == jobs


# -- host locks ---------------------------------------------------------------------------


def test_one_job_per_host_and_waiters_in_submission_order(h: Harness) -> None:
    h.worker("w1", slots=10)
    first, second = h.submit(host="hv1", priority="low"), h.submit(host="hv1")
    other = h.submit(host="hv2")
    third = h.submit(host="hv1", priority="critical")  # newer: waits behind the others
    h.step()
    assert sorted(h.take("w1")) == sorted([first, other])
    assert h.field(second, "wait_reason") == "host:hv1"
    assert h.r.get(h.keys.host("hv1")) == first
    assert h.r.zrange(h.keys.hostwait("hv1"), 0, -1) == [second, third]

    h.finish(first, "failed", 1)  # any end hands the host on
    late = h.submit(host="hv1", priority="critical")
    h.step()
    assert h.take("w1") == [second]
    h.cancel(second)  # a running job: its worker is told; here we finish it cancelled
    h.finish(second, "cancelled", None)
    h.step()
    assert h.take("w1") == [third]
    h.finish(third)
    h.step()
    assert h.take("w1") == [late]
    h.finish(late)
    h.finish(other)
    h.step()
    assert h.r.get(h.keys.host("hv1")) is None
    assert h.r.smembers(h.keys.hosts()) == set()


def test_a_host_whose_holder_dies_with_its_worker_stays_with_the_requeued_job(
    h: Harness,
) -> None:
    h.worker("w1", slots=1)
    a, b = h.submit(host="dev1"), h.submit(host="dev1")
    h.step()
    assert h.take("w1") == [a]
    h.lose_worker("w1")
    h.step()
    assert h.state(a) == "queued" and h.r.get(h.keys.host("dev1")) == a
    h.worker("w2", slots=2)
    h.step()
    assert h.take("w2") == [a]  # the lost job keeps its place; b still waits
    assert h.state(b) == "queued"


def test_cancelling_a_waiter_removes_it_from_the_line(h: Harness) -> None:
    h.worker("w1", slots=3)
    a, b, c = (h.submit(host="h") for _ in range(3))
    h.step()
    assert h.take("w1") == [a]
    assert h.cancel(b) == "cancelled"
    h.finish(a)
    h.step()
    assert h.take("w1") == [c]


# -- retries and lost workers ------------------------------------------------------------


def test_retries_then_fails_and_counts_attempts(h: Harness) -> None:
    h.worker("w1", slots=1)
    job = h.submit(retries=2, retry_delay=0)
    for attempt in (1, 2, 3):
        h.step()
        assert h.take("w1") == [job]
        assert h.field(job, "attempt") == str(attempt)
        out = h.finish(job, "failed", 1)
        assert out == ("retrying" if attempt < 3 else "failed")


def test_a_job_lost_with_its_worker_spends_no_retry(h: Harness) -> None:
    h.worker("w1", slots=1)
    job = h.submit(retries=0)
    h.step()
    assert h.take("w1") == [job]
    h.lose_worker("w1")
    h.worker("w2", slots=1)
    h.step()
    assert h.take("w2") == [job]
    assert h.finish(job, "failed", 1) == "failed"  # retries=0: no retry, and not lost again
    assert h.field(job, "attempt") == "2" and h.field(job, "lost") == "1"


# -- dependencies -------------------------------------------------------------------------


def test_a_dependent_starts_only_after_its_dependencies_completed(h: Harness) -> None:
    h.worker("w1", slots=5)
    a, b = h.submit(), h.submit()
    c = h.submit(depends_on=[a, b])
    h.step()
    assert sorted(h.take("w1")) == sorted([a, b])
    assert h.field(c, "wait_reason") == "dependencies"
    h.finish(a)
    h.step()
    assert h.take("w1") == []
    assert h.r.smembers(h.keys.deps(c)) == {b}
    h.finish(b)
    h.step()
    assert h.take("w1") == [c]


def test_a_failed_dependency_fails_the_whole_chain(h: Harness) -> None:
    h.worker("w1", slots=5)
    a = h.submit()
    b = h.submit(depends_on=[a])
    c = h.submit(depends_on=[b])
    cleanup = h.submit(depends_on=[{"id": a, "on": "any"}])
    on_fail = h.submit(depends_on=[{"id": a, "on": "failure"}])
    on_ok = h.submit(depends_on=[{"id": c, "on": "failure"}])
    h.step()
    assert h.take("w1") == [a]
    h.finish(a, "failed", 2)
    h.step()
    assert (h.state(b), h.field(b, "reason")) == ("failed", "dependency_failed")
    assert (h.state(c), h.field(c, "reason")) == ("failed", "dependency_failed")
    started = sorted(h.take("w1"))
    assert started == sorted([cleanup, on_fail, on_ok])  # c failed, so on_ok's wish came true


def test_a_dependency_already_finished_is_checked_at_admission(h: Harness) -> None:
    h.worker("w1", slots=2)
    a = h.submit()
    h.step()
    h.take("w1")
    h.finish(a)
    ok = h.submit(depends_on=[a])
    bad = h.submit(depends_on=[{"id": a, "on": "failure"}])
    h.step()
    assert h.take("w1") == [ok]
    assert h.field(bad, "reason") == "dependency_failed"


# -- resources ----------------------------------------------------------------------------


def test_only_what_fits_the_ledger_is_dispatched(h: Harness) -> None:
    h.worker("w1", slots=10, cpu=4, memory_mb=8000)
    big1 = h.submit(resources={"cpu": 3})
    big2 = h.submit(resources={"cpu": 3})
    small = h.submit(resources={"cpu": 1, "memory_mb": 100})
    huge = h.submit(resources={"cpu": 16})
    h.step()
    assert sorted(h.take("w1")) == sorted([big1, small])
    assert h.field(big2, "wait_reason") == "resources"
    assert h.field(huge, "wait_reason") == "resources"
    assert float(h.r.hget(h.keys.ledger(), "cpu") or 0) == 4.0
    h.finish(big1)
    h.step()
    assert h.take("w1") == [big2]
    assert float(h.r.hget(h.keys.ledger(), "cpu") or 0) == 4.0
    h.finish(big2)
    h.finish(small)
    assert float(h.r.hget(h.keys.ledger(), "cpu") or 0) == 0.0


# -- limits ---------------------------------------------------------------------------------


def test_stale_jobs_expire_and_hand_their_host_on(h: Harness) -> None:
    blocker = h.submit(host="h")
    stale = h.submit(host="h", stale_after=0.05)
    h.step()
    h.r.zadd(h.keys.stale(), {stale: 0})  # its time has come (Redis' clock decides)
    h.step()
    assert (h.state(stale), h.field(stale, "reason")) == ("expired", "stale")
    assert h.r.zrange(h.keys.hostwait("h"), 0, -1) == []
    assert h.state(blocker) == "queued"


def test_the_owner_limit_counts_active_jobs(r: redis.Redis, keys: Keys, settings: Settings) -> None:
    h = Harness(r, keys, settings.model_copy(update={"max_active_per_user": 2}))
    h.worker("w1", slots=2)
    a, _b = h.submit(), h.submit()
    with pytest.raises(AssertionError, match="-4"):
        h.submit()
    h.step()
    h.take("w1")
    h.finish(a)
    h.step()  # settling counts it off
    assert h.r.hget(h.keys.user("alice"), "active") == "1"
    h.submit()


# -- cron ------------------------------------------------------------------------------------


def test_cron_fires_each_tick_once_with_two_schedulers(h: Harness) -> None:
    from common.cron import Schedule

    h.add_scheduler()
    schedule = Schedule(name="nightly", cron="*/5 * * * *", owner="alice",
                        job={"command": ["true"]})  # type: ignore[arg-type]
    h.r.hset(h.keys.cron_specs(), "nightly", schedule.model_dump_json())
    now = h.schedulers[0].ctx.redis_now_ms()
    missed = now - 3 * 3600 * 1000  # three hours of ticks were missed
    h.r.zadd(h.keys.cron(), {"nightly": missed})
    fired = [s.cron.fire_due() for s in h.schedulers] + [h.schedulers[0].cron.fire_due()]
    assert fired == [1, 0, 0]
    cron_jobs = [eid for eid, f in h.r.xrange(h.keys.submissions())]
    assert len(cron_jobs) == 1
    # the next tick comes after now: the missed ones fired once, not once each
    assert int(h.r.zscore(h.keys.cron(), "nightly") or 0) == next_fire_ms("*/5 * * * *", now)
    # a scheduler that died after submitting but before moving the tick fires into the
    # same job: the idempotency key of (schedule, tick) holds it to one
    h.r.zadd(h.keys.cron(), {"nightly": missed})
    h.schedulers[1].cron.fire("nightly", missed, now)
    assert len(h.r.xrange(h.keys.submissions())) == 1


def test_scheduled_at_waits_in_the_delayed_set(h: Harness) -> None:
    h.worker("w1", slots=1)
    later = datetime.now(UTC) + timedelta(hours=1)
    job = h.submit(scheduled_at=later.isoformat())
    h.step()
    assert h.field(job, "wait_reason") == "scheduled_at"
    assert h.r.zscore(h.keys.delayed(), job) is not None
    h.r.zadd(h.keys.delayed(), {job: 0})  # its time has come
    h.step()
    assert h.take("w1") == [job]
