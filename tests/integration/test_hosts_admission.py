"""admit.lua and dispatch.lua with batches, against the real server: what admission does
once per batch (acknowledge, delete, list queue names) and what enqueue does per job
(one read, one write of the hash) must leave the same state as one job at a time did,
host locks and their FIFO lines included."""

from __future__ import annotations

import pytest
import redis

from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_SCHEDULERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from tests.integration.harness import Harness

MAXLEN = 100_000
STEP_MS = 300_000


def _submit_many(s: sc.Scripts, r: redis.Redis, keys: Keys, specs: list[dict[str, object]]
                 ) -> list[str]:
    """Submit jobs in one pipeline, in order; returns their ids."""
    ids = []
    pipe = r.pipeline(transaction=False)
    for spec in specs:
        sub = JobSubmission.model_validate({"command": ["true"], **spec})
        job_id = new_job_id()
        ids.append(job_id)
        s.run(sc.submit(keys, job_id, "alice", submission_fields(sub), events_maxlen=MAXLEN),
              pipe)
    pipe.execute()
    return ids


def _read(r: redis.Redis, keys: Keys, count: int) -> list[sc.Admission]:
    ensure_group(r, keys.submissions(), GROUP_SCHEDULERS)
    got = r.xreadgroup(GROUP_SCHEDULERS, "s1", {keys.submissions(): ">"}, count=count)
    return [sc.Admission(entry_id, f["id"], f["q"], f["h"] or None)
            for _stream, items in got or [] for entry_id, f in items]


def _admit(s: sc.Scripts, keys: Keys, entries: list[sc.Admission]) -> int:
    return int(s.run(sc.admit(keys, entries, events_maxlen=MAXLEN, priority_step_ms=STEP_MS,
                              by="s1")))


def _pending(r: redis.Redis, keys: Keys) -> int:
    return int(r.xpending(keys.submissions(), GROUP_SCHEDULERS)["pending"])


def test_one_batch_gives_a_host_to_its_first_job_and_lines_up_the_rest(
    r: redis.Redis, keys: Keys,
) -> None:
    s = sc.Scripts(r)
    ids = _submit_many(s, r, keys, [
        {"host": "hv1", "priority": "low"}, {"host": "hv1"}, {"queue": "gpu"},
        {"host": "hv1", "priority": "critical"}, {"host": "hv2"}, {"host": "hv1"},
    ])
    first, second, gpu, third, other, fourth = ids
    entries = _read(r, keys, 100)
    assert _admit(s, keys, entries) == 6

    assert r.xlen(keys.submissions()) == 0 and _pending(r, keys) == 0
    assert r.smembers(keys.queues()) == {"default", "gpu"}
    assert r.smembers(keys.hosts()) == {"hv1", "hv2"}
    assert r.get(keys.host("hv1")) == first and r.get(keys.host("hv2")) == other
    # waiters in submission order, whatever their priority
    assert r.zrange(keys.hostwait("hv1"), 0, -1) == [second, third, fourth]
    assert r.zrange(keys.queue("default"), 0, -1) == [other, first]  # low counts 300 s later
    assert r.zrange(keys.queue("gpu"), 0, -1) == [gpu]
    for job_id in ids:
        state, reason, admitted, score, seq = r.hmget(
            keys.job(job_id), "state", "wait_reason", "admitted_at", "score", "seq")
        assert state == "queued" and admitted and score and seq == "2"
        want = "host:hv1" if job_id in (second, third, fourth) else "priority"
        assert reason == want
    queued = [f for _id, f in r.xrange(keys.events()) if f["state"] == "queued"]
    assert [(f["job"], f["wait_reason"]) for f in queued] == [
        (j, r.hget(keys.job(j), "wait_reason")) for j in ids]

    # the same entries admitted again (a scheduler that died before its answer): no change
    before = (r.xlen(keys.events()), r.zrange(keys.hostwait("hv1"), 0, -1),
              r.zrange(keys.queue("default"), 0, -1))
    assert _admit(s, keys, entries) == 0
    assert before == (r.xlen(keys.events()), r.zrange(keys.hostwait("hv1"), 0, -1),
                      r.zrange(keys.queue("default"), 0, -1))


def test_a_scheduled_job_keeps_no_score_and_waits_in_the_delayed_set(
    r: redis.Redis, keys: Keys,
) -> None:
    s = sc.Scripts(r)
    [job] = _submit_many(s, r, keys, [{"host": "hv1", "scheduled_at": "2999-01-01T00:00:00Z"}])
    assert _admit(s, keys, _read(r, keys, 10)) == 1
    assert r.zrange(keys.delayed(), 0, -1) == [job]
    assert r.hmget(keys.job(job), "state", "wait_reason", "score") == [
        "queued", "scheduled_at", None]
    assert r.get(keys.host("hv1")) is None and r.smembers(keys.hosts()) == set()


def test_batches_larger_than_one_chunk_are_all_acknowledged_and_dispatched(
    r: redis.Redis, keys: Keys,
) -> None:
    s = sc.Scripts(r)
    n = 1_100  # admit.lua and dispatch.lua send their batch-wide commands by 1,000
    ids = _submit_many(s, r, keys, [{"stale_after": 3600}] * n)
    entries = _read(r, keys, n)
    assert len(entries) == n
    assert _admit(s, keys, entries) == n
    assert r.xlen(keys.submissions()) == 0 and _pending(r, keys) == 0
    assert r.zcard(keys.stale()) == n

    order = r.zrange(keys.queue("default"), 0, -1)
    assert order == ids
    sent = s.run(sc.dispatch(keys, "default", order, capacity=sc.Capacity(n),
                             events_maxlen=MAXLEN, by="s1"))
    assert sent == [n, 0]
    assert r.zcard(keys.queue("default")) == 0 and r.zcard(keys.stale()) == 0
    assert r.xlen(keys.dispatch("default")) == n


def test_dispatch_skips_candidates_that_left_the_queue(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    a, b, c = _submit_many(s, r, keys, [{"stale_after": 3600}] * 2 + [{"resources": {"cpu": 8}}])
    _admit(s, keys, _read(r, keys, 10))
    r.zrem(keys.queue("default"), a)  # taken elsewhere since the caller read the queue
    cap = sc.Capacity(slots=3, cpu=4, memory_mb=1024, max_cpu=4, max_memory_mb=1024)
    sent = s.run(sc.dispatch(keys, "default", [a, b, c], capacity=cap, events_maxlen=MAXLEN,
                             by="s1"))
    assert sent == [1, 1]  # b went; c does not fit
    assert r.hget(keys.job(a), "state") == "queued" and r.hget(keys.job(b), "state") == "dispatched"
    assert r.hmget(keys.job(c), "state", "wait_reason") == ["queued", "resources"]
    assert r.zrange(keys.queue("default"), 0, -1) == [c]
    assert r.zrange(keys.stale(), 0, -1) == [a]  # b's stale deadline went with it

    # a job that does not fit and is no longer in the queue is not counted as held back
    r.zrem(keys.queue("default"), c)
    r.hset(keys.job(c), "wait_reason", "priority")
    assert s.run(sc.dispatch(keys, "default", [c], capacity=cap, events_maxlen=MAXLEN,
                             by="s1")) == [0, 0]
    assert r.hget(keys.job(c), "wait_reason") == "priority"


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    return Harness(r, keys, settings)


def test_a_host_stays_listed_while_it_is_held_or_waited_for(h: Harness) -> None:
    h.worker("w1", slots=5)
    a, b = h.submit(host="hv1"), h.submit(host="hv1")
    h.step()
    assert h.take("w1") == [a]
    h.finish(a)
    c = h.submit(host="hv1")  # admitted while b holds the host: c waits behind it
    h.step()
    assert h.take("w1") == [b]
    assert h.r.smembers(h.keys.hosts()) == {"hv1"}
    assert h.r.zrange(h.keys.hostwait("hv1"), 0, -1) == [c]
    h.finish(b)
    h.step()
    assert h.take("w1") == [c]
    assert h.r.smembers(h.keys.hosts()) == {"hv1"}
    h.finish(c)
    h.step()
    assert h.r.smembers(h.keys.hosts()) == set() and h.r.get(h.keys.host("hv1")) is None
    d = h.submit(host="hv1")  # a free host is taken (and listed) again
    h.step()
    assert h.take("w1") == [d]
    assert h.r.smembers(h.keys.hosts()) == {"hv1"}


def test_due_jobs_are_promoted_once_each_in_one_call(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    later = "2999-01-01T00:00:00Z"
    a, b, c = _submit_many(s, r, keys, [{"host": "hv1", "scheduled_at": later}] * 2
                           + [{"scheduled_at": later}])
    assert _admit(s, keys, _read(r, keys, 10)) == 3
    r.zadd(keys.delayed(), {a: 1000, b: 2000})  # their time has come; c's has not
    candidates = [(a, "default", "hv1"), (b, "default", "hv1"), (a, "default", "hv1"),
                  (c, "default", None)]
    assert s.run(sc.promote_due(keys, candidates, events_maxlen=MAXLEN,
                                priority_step_ms=STEP_MS, by="s1")) == 2
    assert r.zrange(keys.delayed(), 0, -1) == [c]
    assert r.get(keys.host("hv1")) == a and r.zrange(keys.queue("default"), 0, -1) == [a]
    assert r.zrange(keys.hostwait("hv1"), 0, -1) == [b]
    assert r.hmget(keys.job(a), "wait_reason", "due_at", "scheduled_at", "score") == [
        "priority", "1000", None, str(1000 + 2 * STEP_MS)]
    assert r.hmget(keys.job(b), "wait_reason", "due_at") == ["host:hv1", "2000"]
    queued = [f["job"] for _id, f in r.xrange(keys.events()) if f["state"] == "queued"]
    assert queued.count(a) == 2 and queued.count(b) == 2  # admitted, then promoted once
