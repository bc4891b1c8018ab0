"""Every path to a terminal state wakes the job's live log followers through its done
stream ({tidal}:done:<id>, which only a follower creates), not only finish.lua: cancel
while queued, reclaim (poison, or cancelled while its worker died), expire, and a
dependency that ended the wrong way (depend.lua at admission, resolve.lua later). A
follower blocked on a job that ends by one of these paths must end at once, not at the end
of its read block.

Each of these paths also appends exactly one entry (`job`, `state`) to the global finished
stream ({tidal}:finished), which the API's waits for a job's end read; a transition that
does not end the job (a requeue, a retry, a cancel request to a running job) adds none."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from api.routes import logs as log_routes
from common import scripts as sc
from common.jobs import new_job_id, submission_fields
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.streams import ensure_group, watch_done
from tests.integration.test_api_logs import parse_frames

MAXLEN = 10_000
STEP_MS = 300_000
DEADLINE_S = 30.0


def _follow(r: redis.Redis, keys: Keys, job_id: str) -> None:
    """Register a follower of the job's end, as the API's follow does before it reads the
    state: only a followed job's end is written to its done stream."""
    pipe = r.pipeline(transaction=False)
    watch_done(pipe, keys.done(job_id))
    pipe.execute()


def _done_state(r: redis.Redis, keys: Keys, job_id: str) -> str | None:
    """The state in the job's done stream (None: its followers were never woken)."""
    entries = r.xrange(keys.done(job_id))
    return str(entries[-1][1]["state"]) if entries and "state" in entries[-1][1] else None


def _finished(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    """The finished stream's entries, oldest first."""
    return [dict(fields) for _id, fields in r.xrange(keys.finished())]


def _blocked_xread_clients(r: redis.Redis) -> set[str]:
    return {str(c["id"]) for c in r.client_list()
            if "b" in str(c.get("flags", "")) and c.get("cmd") == "xread"}


def _wait_for(pred: Any, what: str) -> None:
    """Wait on a condition with a deadline (no sleep as synchronisation: each try is a
    round trip to the server)."""
    event = threading.Event()
    deadline = DEADLINE_S
    step = 0.01
    while not pred():
        if deadline <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        event.wait(step)
        deadline -= step


def test_follower_of_a_job_cancelled_while_queued_ends_at_once(
    client: TestClient, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower blocks far longer than the test's deadline: only the done stream
    written by cancel.lua can end its follow in time."""
    monkeypatch.setattr(log_routes, "BLOCK_MS", 600_000)
    job_id = str(client.post("/jobs", json={"command": ["make"]}).json()["id"])
    [first] = [str(r.xadd(keys.log(job_id), {"s": "o", "t": 1, "l": "before"}))]
    before = _blocked_xread_clients(r)
    frames: list[dict[str, str]] = []
    got_line = threading.Event()

    def follow() -> None:
        with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true"}) as resp:
            for frame in parse_frames(resp.iter_text()):
                frames.append(frame)
                got_line.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        assert got_line.wait(DEADLINE_S)
        # the follower is now blocked in its XREAD (the job is still pending)
        _wait_for(lambda: bool(_blocked_xread_clients(r) - before), "the follower to block")
        resp = client.delete(f"/jobs/{job_id}")
        assert resp.status_code == 202 and resp.json()["state"] == "cancelled"
        follower.join(DEADLINE_S)
        ended = not follower.is_alive()
    finally:
        if follower.is_alive():  # unblock it so the app can shut down; the test fails
            r.xadd(keys.done(job_id), {"state": "cancelled"})
            follower.join(DEADLINE_S)
    assert ended, "the follow did not end when its job was cancelled while queued"
    assert [(f.get("event"), f.get("id")) for f in frames] == [("line", first), ("end", None)]
    assert orjson.loads(frames[-1]["data"])["state"] == "cancelled"
    assert _done_state(r, keys, job_id) == "cancelled"
    assert _finished(r, keys) == [{"job": job_id, "state": "cancelled"}]


def test_two_followers_of_one_job_both_end_when_it_is_cancelled(
    client: TestClient, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each follower writes its marker in the job's done stream, which keeps one entry: the
    second one's marker wakes the first, which must look at the state and block again
    (its cursor past that marker), not spin, and still be woken by the end."""
    monkeypatch.setattr(log_routes, "BLOCK_MS", 600_000)
    job_id = str(client.post("/jobs", json={"command": ["make"]}).json()["id"])
    r.xadd(keys.log(job_id), {"s": "o", "t": 1, "l": "before"})
    before = _blocked_xread_clients(r)
    ends: list[str] = []

    def follow() -> None:
        with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true"}) as resp:
            for frame in parse_frames(resp.iter_text()):
                if frame.get("event") == "end":
                    ends.append(orjson.loads(frame["data"])["state"])

    followers = [threading.Thread(target=follow, daemon=True) for _ in range(2)]
    try:
        followers[0].start()
        _wait_for(lambda: len(_blocked_xread_clients(r) - before) == 1, "the first to block")
        followers[1].start()
        _wait_for(lambda: len(_blocked_xread_clients(r) - before) == 2, "both to block")
        assert 0 < r.ttl(keys.done(job_id)) <= 60
        assert client.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
        for follower in followers:
            follower.join(DEADLINE_S)
    finally:
        if any(f.is_alive() for f in followers):  # unblock them; the test fails
            r.xadd(keys.done(job_id), {"state": "cancelled"})
            for follower in followers:
                follower.join(DEADLINE_S)
    assert ends == ["cancelled", "cancelled"]


# -- each script, against the real server ---------------------------------------------------


def _submit(s: sc.Scripts, keys: Keys, **kw: object) -> str:
    """Submit a job, and follow it (`_follow`)."""
    job_id = new_job_id()
    sub = JobSubmission.model_validate({"command": ["true"], **kw})
    res = s.run(sc.submit(keys, job_id, "alice", submission_fields(sub), events_maxlen=MAXLEN,
                          idempotency_key=sub.idempotency_key))
    _follow(s.client, keys, str(res[1]))
    return str(res[1])


def _pending_admissions(r: redis.Redis, keys: Keys) -> list[sc.Admission]:
    ensure_group(r, keys.submissions(), GROUP_SCHEDULERS)
    got = r.xreadgroup(GROUP_SCHEDULERS, "s1", {keys.submissions(): ">"}, count=100)
    return [sc.Admission(entry_id, f["id"], f["q"], f["h"] or None)
            for _stream, items in got for entry_id, f in items]


def _admit_all(r: redis.Redis, s: sc.Scripts, keys: Keys) -> None:
    if entries := _pending_admissions(r, keys):
        s.run(sc.admit(keys, entries, events_maxlen=MAXLEN, priority_step_ms=STEP_MS, by="s1"))


def _dispatch_and_start(r: redis.Redis, s: sc.Scripts, keys: Keys, job: str, worker: str) -> str:
    s.run(sc.dispatch(keys, "default", [job], capacity=sc.Capacity(10), events_maxlen=MAXLEN,
                      by="s1"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    [(_, items)] = r.xreadgroup(GROUP_WORKERS, worker, {keys.dispatch("default"): ">"}, count=1)
    entry = str(items[0][0])
    s.run(sc.start(keys, "default", [(entry, job)], worker=worker, events_maxlen=MAXLEN))
    return entry


def test_only_a_followed_job_gets_a_done_stream(r: redis.Redis, keys: Keys) -> None:
    """mark_done writes the end only where a follower created the stream: a job nobody
    follows ends without a done-stream key (and its finished entry all the same)."""
    s = sc.Scripts(r)
    alone, followed = _submit(s, keys), _submit(s, keys)
    r.delete(keys.done(alone))  # as if never followed
    _admit_all(r, s, keys)
    for job in (alone, followed):
        assert s.run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN,
                               ttl_s=60)) == "cancelled"
    assert not r.exists(keys.done(alone))
    assert _done_state(r, keys, followed) == "cancelled"
    assert _finished(r, keys) == [{"job": alone, "state": "cancelled"},
                                  {"job": followed, "state": "cancelled"}]


def test_cancel_of_a_queued_job_writes_its_done_stream(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    queued, running = _submit(s, keys), _submit(s, keys)
    _admit_all(r, s, keys)
    _dispatch_and_start(r, s, keys, running, "w1")

    def cancel(job: str) -> object:
        return s.run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN, ttl_s=60))

    assert cancel(queued) == "cancelled"
    assert _done_state(r, keys, queued) == "cancelled"
    assert 0 < r.ttl(keys.done(queued)) <= 60
    assert _finished(r, keys) == [{"job": queued, "state": "cancelled"}]
    # a running job is only flagged: finish.lua ends it (and writes the done stream) later
    assert cancel(running) == "cancelling"
    assert _done_state(r, keys, running) is None
    assert cancel(queued) == -1  # already ended: nothing more is written
    assert _finished(r, keys) == [{"job": queued, "state": "cancelled"}]


def test_reclaim_writes_the_done_stream_of_jobs_it_ends_only(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    requeued, poison, flagged = _submit(s, keys), _submit(s, keys), _submit(s, keys)
    _admit_all(r, s, keys)
    entry = _dispatch_and_start(r, s, keys, poison, "x1")
    assert s.run(sc.reclaim(keys, "default", [(entry, poison)], max_deliveries=1,
                            events_maxlen=MAXLEN, ttl_s=60, by="s1")) == [1, 0]
    assert _done_state(r, keys, poison) is None  # requeued: its followers keep following
    assert _finished(r, keys) == []
    a = _dispatch_and_start(r, s, keys, poison, "x2")
    b = _dispatch_and_start(r, s, keys, requeued, "x3")
    c = _dispatch_and_start(r, s, keys, flagged, "x4")
    assert s.run(sc.cancel(keys, flagged, "default", by="alice", events_maxlen=MAXLEN,
                           ttl_s=60)) == "cancelling"
    assert s.run(sc.reclaim(keys, "default", [(a, poison), (b, requeued), (c, flagged)],
                            max_deliveries=1, events_maxlen=MAXLEN, ttl_s=60,
                            by="s1")) == [1, 2]
    assert r.hmget(keys.job(poison), "state", "reason") == ["failed", "poison"]
    assert _done_state(r, keys, poison) == "failed"
    assert r.hget(keys.job(requeued), "state") == "queued"
    assert _done_state(r, keys, requeued) is None
    assert r.hmget(keys.job(flagged), "state", "reason") == ["cancelled", "cancelled"]
    assert _done_state(r, keys, flagged) == "cancelled"
    # in entry order; the requeued job has none
    assert _finished(r, keys) == [{"job": poison, "state": "failed"},
                                  {"job": flagged, "state": "cancelled"}]


def test_expire_writes_the_done_stream(r: redis.Redis, keys: Keys) -> None:
    s = sc.Scripts(r)
    stale, fresh = _submit(s, keys, stale_after=0.001), _submit(s, keys, stale_after=3600)
    _admit_all(r, s, keys)
    # make the first one due by Redis' own clock (its deadline moved into the past)
    r.zadd(keys.stale(), {stale: 1})
    assert s.run(sc.expire(keys, [(stale, "default", None), (fresh, "default", None)],
                           events_maxlen=MAXLEN, ttl_s=60, by="s1")) == 1
    assert r.hget(keys.job(stale), "state") == "expired"
    assert _done_state(r, keys, stale) == "expired"
    assert _done_state(r, keys, fresh) is None
    assert _finished(r, keys) == [{"job": stale, "state": "expired"}]
    # a second pass over the same candidates ends nothing more
    assert s.run(sc.expire(keys, [(stale, "default", None), (fresh, "default", None)],
                           events_maxlen=MAXLEN, ttl_s=60, by="s1")) == 0
    assert _finished(r, keys) == [{"job": stale, "state": "expired"}]


def test_a_dependency_failure_writes_the_done_stream(r: redis.Redis, keys: Keys) -> None:
    """depend.lua (the dependency had already ended the wrong way) and resolve.lua (it
    ends the wrong way while the dependent waits) both wake the dependent's followers."""
    s = sc.Scripts(r)
    ended, waited = _submit(s, keys), _submit(s, keys)
    _admit_all(r, s, keys)
    assert s.run(sc.cancel(keys, ended, "default", by="alice", events_maxlen=MAXLEN,
                           ttl_s=60)) == "cancelled"
    early, late = _submit(s, keys, depends_on=[ended]), _submit(s, keys, depends_on=[waited])
    by_id = {a.job_id: a for a in _pending_admissions(r, keys)}
    results = [s.run(sc.depend(keys, by_id[job], [(dep, "success")], events_maxlen=MAXLEN,
                               priority_step_ms=STEP_MS, by="s1"))
               for job, dep in ((early, ended), (late, waited))]
    assert results == ["failed", "queued"]
    assert _done_state(r, keys, early) == "failed"
    assert _done_state(r, keys, late) is None
    assert _finished(r, keys) == [{"job": ended, "state": "cancelled"},
                                  {"job": early, "state": "failed"}]

    assert s.run(sc.cancel(keys, waited, "default", by="alice", events_maxlen=MAXLEN,
                           ttl_s=60)) == "cancelled"
    assert s.run(sc.resolve(keys, late, "default", None, waited, "cancelled",
                            events_maxlen=MAXLEN, priority_step_ms=STEP_MS,
                            by="s1")) == "failed"
    assert r.hmget(keys.job(late), "state", "reason") == ["failed", "dependency_failed"]
    assert _done_state(r, keys, late) == "failed"
    assert _finished(r, keys)[2:] == [{"job": waited, "state": "cancelled"},
                                      {"job": late, "state": "failed"}]


def test_a_dependent_failed_by_settle_has_its_done_stream_written(
    r: redis.Redis, keys: Keys, settings: Any
) -> None:
    """The scheduler's settle pass (settle.lua) fails the dependents of a job that ended
    the wrong way: their followers are woken too."""
    from tests.integration.harness import Harness

    h = Harness(r, keys, settings)
    h.worker("w1", slots=2)
    parent = h.submit()
    child = h.submit(depends_on=[parent])
    _follow(r, keys, child)
    h.step()
    h.take("w1")
    h.finish(parent, "failed", exit_code=1)
    h.step()
    assert h.state(child) == "failed" and h.field(child, "reason") == "dependency_failed"
    assert _done_state(r, keys, child) == "failed"
    # the parent by finish.lua, then the child by settle.lua, once each (settling again
    # ends nothing more)
    h.step()
    assert _finished(r, keys) == [{"job": parent, "state": "failed"},
                                  {"job": child, "state": "failed"}]


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_finish_appends_to_the_finished_stream_only_when_the_job_ends(
    r: redis.Redis, keys: Keys, mode: str
) -> None:
    """finish.lua, one call per job or its batch mode (ARGV[1] = '*'): a completed job and
    a failure past its retries each add one entry; a failure that is retried (retrying)
    adds none, nor does a stale token's refused finish."""
    s = sc.Scripts(r)
    quick, flaky = _submit(s, keys), _submit(s, keys, retries=1)
    _admit_all(r, s, keys)
    tokens = {job: _dispatch_and_start(r, s, keys, job, "w1") for job in (quick, flaky)}

    def finish(*ends: tuple[str, str]) -> list[object]:
        calls = [sc.finish(keys, job, "default", tokens[job],
                           sc.Outcome(state, 0 if state == "completed" else 1,
                                      reason="" if state == "completed" else "exit_code"),
                           worker="w1", retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60)
                 for job, state in ends]
        if mode == "batch":
            return list(s.run(sc.finish_batch(calls)))
        return [s.run(call) for call in calls]

    assert finish((quick, "completed"), (flaky, "failed")) == ["completed", "retrying"]
    assert _done_state(r, keys, flaky) is None
    assert _finished(r, keys) == [{"job": quick, "state": "completed"}]
    assert finish((quick, "completed")) == [-1]  # its token was cleared: refused
    assert _finished(r, keys) == [{"job": quick, "state": "completed"}]

    assert s.run(sc.promote_due(keys, [(flaky, "default", None)], events_maxlen=MAXLEN,
                                priority_step_ms=STEP_MS, by="s1")) == 1
    tokens[flaky] = _dispatch_and_start(r, s, keys, flaky, "w1")
    assert finish((flaky, "failed")) == ["failed"]
    assert _done_state(r, keys, flaky) == "failed"
    assert _finished(r, keys) == [{"job": quick, "state": "completed"},
                                  {"job": flaky, "state": "failed"}]


def test_the_finished_stream_is_capped(r: redis.Redis, keys: Keys) -> None:
    """mark_done trims the finished stream with MAXLEN ~ 10000 (approximate: whole
    macro nodes go, so it may keep a little more, never the whole backlog)."""
    s = sc.Scripts(r)
    pipe = r.pipeline(transaction=False)
    for i in range(20_000):
        pipe.xadd(keys.finished(), {"job": f"old{i}", "state": "completed"})
    pipe.execute()
    job = _submit(s, keys)
    _admit_all(r, s, keys)
    assert s.run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN,
                           ttl_s=60)) == "cancelled"
    assert 10_000 <= r.xlen(keys.finished()) < 11_000
    [(_id, last)] = r.xrevrange(keys.finished(), count=1)
    assert last == {"job": job, "state": "cancelled"}
