"""Scripts.run_many: many script calls in one round trip, against the real server."""

from __future__ import annotations

import pytest
import redis

from common import scripts as sc
from common.keys import Keys
from common.settings import Settings
from tests.integration.harness import MAXLEN, Harness


def _calls(keys: Keys, n: int) -> list[sc.Call]:
    # heartbeat.lua on n distinct workers: a script with a visible effect per call
    return [sc.heartbeat(keys, f"w{i}", [], {"slots": i}, ttl_ms=60_000) for i in range(n)]


def test_results_come_back_in_order_and_every_call_ran(r: redis.Redis, keys: Keys) -> None:
    scripts = sc.Scripts(r)
    results = scripts.run_many(_calls(keys, 5))
    assert results == [[[], []]] * 5
    assert [r.hget(keys.worker(f"w{i}"), "slots") for i in range(5)] == [str(i) for i in range(5)]


def test_one_round_trip_for_the_whole_batch(r: redis.Redis, keys: Keys) -> None:
    """Counted by the server: a pipeline with Script objects would add SCRIPT EXISTS."""
    scripts = sc.Scripts(r)
    scripts.run_many(_calls(keys, 1))  # loaded once
    own = r.client_id()
    before = _cmd_count(r, own)
    scripts.run_many(_calls(keys, 1))
    one = _cmd_count(r, own) - before - 1  # an EVALSHA and what runs inside it
    before = _cmd_count(r, own)
    scripts.run_many(_calls(keys, 20))
    # on this very connection: 20 such calls, plus the CLIENT INFO, and nothing else
    assert _cmd_count(r, own) - before == 20 * one + 1


def test_scripts_the_server_lost_are_loaded_again(r: redis.Redis, keys: Keys) -> None:
    scripts = sc.Scripts(r)
    scripts.run_many(_calls(keys, 2))
    r.script_flush()  # as after a restart with an empty server
    assert scripts.run_many(_calls(keys, 3)) == [[[], []]] * 3


def test_errors_raise_or_stay_in_place(r: redis.Redis, keys: Keys) -> None:
    scripts = sc.Scripts(r)
    good = _calls(keys, 1)[0]
    r.set(keys.worker("bad"), "not a hash")  # HSET on it fails inside the script
    bad = sc.heartbeat(keys, "bad", [], {"slots": 1}, ttl_ms=60_000)
    with pytest.raises(redis.ResponseError):
        scripts.run_many([good, bad, good])
    results = scripts.run_many([good, bad, good], raise_errors=False)
    assert results[0] == results[2] == [[], []]
    assert isinstance(results[1], redis.ResponseError)


def _cmd_count(r: redis.Redis, client_id: int) -> int:
    info = r.client_info()
    assert int(info["id"]) == client_id  # the same connection as the batch
    return int(info["tot-cmds"])


# -- finish.lua's batch mode ----------------------------------------------------------------


def _finish_call(h: Harness, job_id: str, outcome: sc.Outcome, token: str | None = None
                 ) -> sc.Call:
    run = h.running[job_id]
    return sc.finish(h.keys, job_id, run.queue, token or run.token, outcome, worker=run.worker,
                     retry_delay_ms=60_000, events_maxlen=MAXLEN, ttl_s=3600)


def test_a_finish_batch_is_the_single_calls_in_one(r: redis.Redis, keys: Keys,
                                                   settings: Settings) -> None:
    h = Harness(r, keys, settings)
    h.worker("w1", slots=4)
    done, retried, stale = h.submit(), h.submit(retries=1), h.submit()
    h.step()
    h.take("w1")
    usage = (("peak_rss_kb", "512"), ("cpu_s", "0.25"))
    calls = [
        _finish_call(h, done, sc.Outcome("completed", 0, result="[1]", usage=usage)),
        _finish_call(h, retried, sc.Outcome("failed", 3, error="boom", reason="exit_code")),
        _finish_call(h, stale, sc.Outcome("completed", 0), token="0-1"),  # not its attempt
    ]
    r.script_load(sc.source("finish"))  # so the one call below is the only EVALSHA
    before = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    answers = sc.Scripts(r).run(sc.finish_batch(calls))
    assert r.info("commandstats")["cmdstat_evalsha"]["calls"] - before == 1
    assert answers == ["completed", "retrying", -1]
    assert r.hmget(keys.job(done), "state", "result", "peak_rss_kb", "cpu_s") == [
        "completed", "[1]", "512", "0.25"]
    assert r.hmget(keys.job(retried), "state", "error", "exit_code") == ["retrying", "boom", "3"]
    assert h.state(stale) == "running"
    assert r.ttl(keys.job(done)) > 0
    assert not r.exists(keys.done(done))  # nobody follows it: no done stream
    assert r.xlen(keys.settle()) == 1  # the finished job only; a retry is not settled
    # seq moved with each event: the hash's number is the last event's
    events = [f for _id, f in r.xrange(keys.events()) if f["job"] == done]
    assert [int(f["seq"]) for f in events] == list(range(1, len(events) + 1))
    assert r.hget(keys.job(done), "seq") == str(len(events))


def test_finish_batch_refuses_calls_of_different_workers(r: redis.Redis, keys: Keys,
                                                         settings: Settings) -> None:
    h = Harness(r, keys, settings)
    h.worker("w1", slots=2)
    a, b = h.submit(), h.submit()
    h.step()
    h.take("w1")
    one = _finish_call(h, a, sc.Outcome("completed", 0))
    other = _finish_call(h, b, sc.Outcome("completed", 0))
    other = sc.Call(other.script, other.keys, [*other.args[:10], "w2", *other.args[11:]])
    with pytest.raises(ValueError, match="different workers"):
        sc.finish_batch([one, other])
