"""Every Lua script against the real server, step by step along a job's life."""

from __future__ import annotations

import redis

from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.streams import ensure_group

MAXLEN = 10_000
STEP_MS = 300_000


def _submit(r: redis.Redis, s: sc.Scripts, keys: Keys, **kw: object) -> str:
    job_id = new_job_id()
    sub = JobSubmission.model_validate({"command": ["true"], **kw})
    res = s.run(
        sc.submit(keys, job_id, "alice", submission_fields(sub), events_maxlen=MAXLEN,
                  idempotency_key=sub.idempotency_key)
    )
    assert res[0] in (0, 1)
    return str(res[1])


def _admit_all(r: redis.Redis, s: sc.Scripts, keys: Keys) -> int:
    ensure_group(r, keys.submissions(), GROUP_SCHEDULERS)
    got = r.xreadgroup(GROUP_SCHEDULERS, "s1", {keys.submissions(): ">"}, count=100)
    entries = [sc.Admission(entry_id, f["id"], f["q"], f["h"] or None)
               for _stream, items in got for entry_id, f in items]
    if not entries:
        return 0
    return int(s.run(sc.admit(keys, entries, events_maxlen=MAXLEN, priority_step_ms=STEP_MS,
                              by="s1")))


def test_submit_writes_pending_hash_and_is_idempotent(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    a = _submit(r, s, keys, idempotency_key="k1")
    b = _submit(r, s, keys, idempotency_key="k1")
    assert a == b
    assert r.hget(keys.job(a), "state") == "pending"
    assert r.xlen(keys.submissions()) == 1
    assert r.xlen(keys.events()) == 1


def test_priority_orders_queue_and_dispatch_respects_capacity(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    low = _submit(r, s, keys, priority="low")
    crit = _submit(r, s, keys, priority="critical")
    norm = _submit(r, s, keys)
    assert _admit_all(r, s, keys) == 3
    order = r.zrange(keys.queue("default"), 0, -1)
    assert order == [crit, norm, low]
    assert r.xlen(keys.submissions()) == 0  # acknowledged and deleted

    sent = s.run(sc.dispatch(keys, "default", order, capacity=sc.Capacity(2), events_maxlen=MAXLEN,
                             by="s1"))
    assert sent == [2, 0]
    assert r.xlen(keys.dispatch("default")) == 2
    assert r.zrange(keys.queue("default"), 0, -1) == [low]
    # no free slot left: nothing more goes out
    assert s.run(sc.dispatch(keys, "default", [low], capacity=sc.Capacity(2),
                             events_maxlen=MAXLEN, by="s1")) == [0, 0]


def test_start_finish_and_fencing(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    job = _submit(r, s, keys)
    _admit_all(r, s, keys)
    s.run(sc.dispatch(keys, "default", [job], capacity=sc.Capacity(1), events_maxlen=MAXLEN,
                      by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w1", {keys.dispatch("default"): ">"}, count=10)
    entry, fields = items[0]
    [started] = s.run(sc.start(keys, "default", [(entry, fields["id"])], worker="w1",
                               events_maxlen=MAXLEN))
    assert started[0] == job and started[1] == 1
    assert r.hget(keys.job(job), "state") == "running"

    stale = sc.finish(keys, job, "default", "0-1", sc.Outcome("completed", 0), worker="w0",
                      retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60)
    assert s.run(stale) == -1
    done = sc.finish(keys, job, "default", entry, sc.Outcome("completed", 0), worker="w1",
                     retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60)
    assert s.run(done) == "completed"
    assert r.xlen(keys.dispatch("default")) == 0
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0
    assert r.ttl(keys.job(job)) > 0
    states = [f["state"] for _, f in r.xrange(keys.events())]
    assert states == ["pending", "queued", "dispatched", "running", "completed"]
    assert s.run(done) == -1  # token cleared: a second finish is refused


def test_failed_attempt_with_retries_goes_to_delayed_then_back(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    job = _submit(r, s, keys, retries=1)
    _admit_all(r, s, keys)
    s.run(sc.dispatch(keys, "default", [job], capacity=sc.Capacity(1), events_maxlen=MAXLEN,
                      by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w1", {keys.dispatch("default"): ">"}, count=1)
    entry = items[0][0]
    s.run(sc.start(keys, "default", [(entry, job)], worker="w1", events_maxlen=MAXLEN))
    out = s.run(sc.finish(keys, job, "default", entry, sc.Outcome("failed", 1, reason="exit_code"),
                          worker="w1", retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60))
    assert out == "retrying"
    assert r.zscore(keys.delayed(), job) is not None
    assert s.run(sc.promote_due(keys, [(job, "default", None)], events_maxlen=MAXLEN,
                                priority_step_ms=STEP_MS, by="s1")) == 1
    assert r.zrange(keys.queue("default"), 0, -1) == [job]
    assert r.hget(keys.job(job), "state") == "queued"


def test_cancel_in_each_state(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    queued = _submit(r, s, keys)
    running = _submit(r, s, keys)
    _admit_all(r, s, keys)

    def cancel(job: str) -> object:
        return s.run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN, ttl_s=60))

    s.run(sc.dispatch(keys, "default", [running], capacity=sc.Capacity(1),
                      events_maxlen=MAXLEN, by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w1", {keys.dispatch("default"): ">"}, count=1)
    token = items[0][0]
    s.run(sc.start(keys, "default", [(token, running)], worker="w1", events_maxlen=MAXLEN))

    assert cancel(queued) == "cancelled"
    assert r.zscore(keys.queue("default"), queued) is None
    assert cancel(queued) == -1
    assert cancel(running) == "cancelling"
    assert r.hget(keys.job(running), "cancel") == "1"
    hb = s.run(sc.heartbeat(keys, "w1", [(running, token)], {"slots": 1}, ttl_ms=5000))
    assert hb == [[running], []]
    # a worker whose token no longer matches learns that it lost the job
    hb = s.run(sc.heartbeat(keys, "w1", [(running, "0-1")], {"slots": 1}, ttl_ms=5000))
    assert hb == [[], [running]]
    assert r.pttl(keys.worker("w1")) > 0
    assert cancel("nope") == -3


def _dispatch_and_start(r: redis.Redis, s: sc.Scripts, keys: Keys, job: str, worker: str) -> str:
    s.run(sc.dispatch(keys, "default", [job], capacity=sc.Capacity(1), events_maxlen=MAXLEN,
                      by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, worker, {keys.dispatch("default"): ">"}, count=1)
    entry = items[0][0]
    s.run(sc.start(keys, "default", [(entry, job)], worker=worker, events_maxlen=MAXLEN))
    return str(entry)


def test_hand_backs_spend_no_retry_and_never_make_a_job_poison(
    r: redis.Redis, keys: Keys
) -> None:
    """Rolling restarts: handed back more often than max_deliveries, the job is requeued
    every time; its one retry is still there for a real failure afterwards. A job LOST as
    often fails as poison."""
    s = sc.Scripts(r)
    job, lost_job = _submit(r, s, keys, retries=1), _submit(r, s, keys)
    _admit_all(r, s, keys)
    for n in range(4):
        entry = _dispatch_and_start(r, s, keys, job, f"w{n}")
        assert s.run(sc.reclaim(keys, "default", [(entry, job)], max_deliveries=2,
                                events_maxlen=MAXLEN, ttl_s=60, by=f"w{n}",
                                handed_back=True)) == [1, 0]
        assert r.hget(keys.job(job), "state") == "queued"
    reasons = [f.get("reason") for _, f in r.xrange(keys.events())
               if f["job"] == job and f["state"] == "queued"]
    assert reasons[-4:] == ["handed_back"] * 4
    entry = _dispatch_and_start(r, s, keys, job, "w9")
    failed = sc.Outcome("failed", 1, reason="exit_code")
    assert s.run(sc.finish(keys, job, "default", entry, failed, worker="w9", retry_delay_ms=0,
                           events_maxlen=MAXLEN, ttl_s=60)) == "retrying"
    assert r.hmget(keys.job(job), "attempt", "handed_back", "lost") == ["5", "4", None]

    r.zrem(keys.queue("default"), job)
    outcomes = []
    for n in range(3):
        entry = _dispatch_and_start(r, s, keys, lost_job, f"x{n}")
        outcomes.append(s.run(sc.reclaim(keys, "default", [(entry, lost_job)],
                                         max_deliveries=2, events_maxlen=MAXLEN, ttl_s=60,
                                         by="s1")))
    assert outcomes == [[1, 0], [1, 0], [0, 1]]
    assert r.hmget(keys.job(lost_job), "state", "reason") == ["failed", "poison"]


def _publish(r: redis.Redis, keys: Keys, slots: int) -> None:
    r.hset(keys.capacity("default"), mapping={
        "slots": slots, "cpu": 8, "memory_mb": 8192, "gpu": 0, "max_cpu": 8,
        "max_memory_mb": 8192, "max_gpu": 0})


def _worker_dispatch(s: sc.Scripts, keys: Keys, candidates: list[str]) -> list[int]:
    return list(s.run(sc.dispatch(keys, "default", candidates, capacity=None,
                                  events_maxlen=MAXLEN, by="w1")))


def test_worker_dispatch_needs_published_capacity_and_keeps_within_it(
    r: redis.Redis, keys: Keys,
) -> None:
    s = sc.Scripts(r)
    jobs = [_submit(r, s, keys) for _ in range(3)]
    _admit_all(r, s, keys)
    # no capacity published (no scheduler counted the workers): nothing goes out
    assert _worker_dispatch(s, keys, jobs) == [0, 0]
    _publish(r, keys, 2)
    assert _worker_dispatch(s, keys, jobs) == [2, 0]
    assert r.xlen(keys.dispatch("default")) == 2
    assert [r.hget(keys.job(j), "state") for j in jobs] == ["dispatched", "dispatched", "queued"]
    # the stream is full: a worker's stale view of the head sends nothing more
    assert _worker_dispatch(s, keys, jobs) == [0, 0]


def test_worker_dispatch_sends_only_the_head_it_knows(r: redis.Redis, keys: Keys) -> None:
    """Candidates read earlier send only the prefix of the queue's head as it is now: a
    better job that came in meanwhile stops the call (the scheduler sends it), and jobs
    someone else took are skipped."""
    s = sc.Scripts(r)
    a, b, c = (_submit(r, s, keys) for _ in range(3))
    _admit_all(r, s, keys)
    _publish(r, keys, 10)
    seen = r.zrange(keys.queue("default"), 0, -1)
    assert seen == [a, b, c]
    crit = _submit(r, s, keys, priority="critical")
    _admit_all(r, s, keys)
    assert _worker_dispatch(s, keys, seen) == [0, 0]
    assert r.hget(keys.job(a), "state") == "queued"
    # the scheduler sends the critical job and `a`; the worker's stale view still serves
    s.run(sc.dispatch(keys, "default", [crit, a], capacity=sc.Capacity(10),
                      events_maxlen=MAXLEN, by="s1"))
    assert _worker_dispatch(s, keys, seen) == [2, 0]
    assert [r.hget(keys.job(j), "state") for j in (b, c)] == ["dispatched", "dispatched"]
    assert r.xlen(keys.dispatch("default")) == 4
    events = [f for _, f in r.xrange(keys.events()) if f.get("state") == "dispatched"]
    assert [f.get("by") for f in events] == ["s1", "s1", "w1", "w1"]


def _running(r: redis.Redis, s: sc.Scripts, keys: Keys, job: str) -> tuple[str, str]:
    """Dispatch and start `job` (admitted); returns (its token, the owner start.lua gave)."""
    s.run(sc.dispatch(keys, "default", [job], capacity=sc.Capacity(10), events_maxlen=MAXLEN,
                      by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, "w1", {keys.dispatch("default"): ">"}, count=1)
    entry = items[0][0]
    [row] = s.run(sc.start(keys, "default", [(entry, job)], worker="w1", events_maxlen=MAXLEN))
    return entry, row[4]


def test_finish_settles_a_plain_job_itself_when_told_its_owner(
    r: redis.Redis, keys: Keys,
) -> None:
    """With the owner named, a job without host or dependents is counted off its owner's
    active jobs in finish.lua and never reaches the settle stream; a job with dependents or
    a host, or a wrong owner, still goes there (the scheduler has follow-up to do)."""
    s = sc.Scripts(r)
    plain, with_dependent, with_host, wrong = (_submit(r, s, keys) for _ in range(4))
    _admit_all(r, s, keys)
    r.sadd(keys.dependents(with_dependent), "someone")
    r.hset(keys.job(with_host), "host", "h1")
    assert int(r.hget(keys.user("alice"), "active")) == 4
    tokens = {job: _running(r, s, keys, job) for job in (plain, with_dependent, with_host, wrong)}
    assert {owner for _, owner in tokens.values()} == {"alice"}

    def finish(job: str, owner: str) -> sc.Call:
        return sc.finish(keys, job, "default", tokens[job][0], sc.Outcome("completed", 0),
                         worker="w1", retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60,
                         owner=owner)

    assert s.run(finish(plain, "alice")) == "completed"
    assert r.xlen(keys.settle()) == 0 and int(r.hget(keys.user("alice"), "active")) == 3
    assert [f["job"] for _, f in r.xrange(keys.finished())] == [plain]
    batch = sc.finish_batch([finish(with_dependent, "alice"), finish(with_host, "alice"),
                             finish(wrong, "bob")])
    assert s.run(batch) == ["completed"] * 3
    assert [f["id"] for _, f in r.xrange(keys.settle())] == [with_dependent, with_host, wrong]
    assert int(r.hget(keys.user("alice"), "active")) == 3  # settle.lua counts those off
