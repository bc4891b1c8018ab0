"""Scripts.run_many: many script calls in one round trip, against the real server."""

from __future__ import annotations

import pytest
import redis

from common import scripts as sc
from common.keys import Keys


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
