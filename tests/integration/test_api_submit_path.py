"""The submit path of POST /jobs (docs/performance.md, "API"): one submit.lua call per
request in batch mode, the answer built from the submissions (not read back), the ids made
in bulk, and the guarantees that must hold all the same: 422 naming index and field with
nothing written, 429 refusing a batch whole, idempotency, the 503 envelope."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from ulid import ULID

from api import validate
from api.app import _HiredisPacking, create_app
from api.routes import jobs as jobs_route
from common import scripts as sc
from common.keys import Keys
from common.settings import Settings
from common.valkey import free_port
from tests.integration.conftest import ADMIN, ADMIN_TOKEN


def app_client(settings: Settings, **update: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"token": ADMIN_TOKEN, **update})),
                      headers=ADMIN)


@pytest.fixture
def limited(settings: Settings, r: redis.Redis) -> Iterator[TestClient]:
    with app_client(settings, max_active_per_user=3, max_queue_size=0) as c:
        yield c


def job_keys(r: redis.Redis, keys: Keys) -> list[str]:
    return list(r.scan_iter(match=keys.job("*"), count=1000))


# -- the answer ---------------------------------------------------------------------------

VARIED: list[dict[str, Any]] = [
    {"command": ["sh", "-c", "make test"], "env": {"CI": "1"}, "cwd": "/srv/app",
     "priority": "high", "queue": "build", "timeout": 600, "retries": 2, "retry_delay": 5,
     "host": "hv-07", "tags": {"team": "infra"}, "stale_after": 60},
    {"kind": "python", "function": "common.tasks:echo", "args": [1, {"a": [2.5, None]}],
     "kwargs": {"x": "ü"}, "resources": {"cpu": 1.5}, "idempotency_key": "k-1"},
    {"command": "echo hi", "scheduled_at": "2030-01-02T03:04:05.5Z", "priority": "background",
     "callback_url": "https://example.invalid/hook", "resources": {"memory_mb": 64, "gpu": 0}},
    {"command": ["true"], "priority": "normal", "retries": 0},  # defaults given explicitly
]


def test_batch_documents_are_what_get_shows(client: TestClient) -> None:
    dep = client.post("/jobs", json={"command": ["true"]}).json()["id"]
    subs = [*VARIED, {"command": ["true"], "depends_on": [dep, {"id": dep, "on": "any"}]}]
    resp = client.post("/jobs", json=subs)
    assert resp.status_code == 202, resp.text
    assert resp.headers["content-type"] == "application/json"
    jobs = resp.json()["jobs"]
    assert len(jobs) == len(subs)
    for job in jobs:
        got = client.get(f"/jobs/{job['id']}").json()
        assert got.pop("poll_after_ms") == 1000  # only GET says when to ask again
        assert job == got  # every field, nulls included, formatted the same
    assert [j["state"] for j in jobs] == ["pending"] * len(subs)
    assert jobs[0]["host"] == "hv-07" and jobs[0]["timeout"] == 600.0
    assert "retry_delay" not in jobs[0]
    assert jobs[1]["resources"] == {"cpu": 1.5, "memory_mb": 0, "gpu": 0}
    assert jobs[2]["scheduled_at"].startswith("2030-01-02T03:04:05.5")
    assert jobs[4]["depends_on"] == [dep, {"id": dep, "on": "any"}]


def test_one_job_answers_its_document(client: TestClient) -> None:
    for sub in VARIED:
        resp = client.post("/jobs", json={**sub, "idempotency_key": None})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert client.get(f"/jobs/{job['id']}").json() == job | {"poll_after_ms": 1000}


def test_the_submission_is_written_as_submit_lua_writes_one(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """Batch mode leaves what the one-job mode (used by cron and doctor) leaves."""
    sub = {"command": ["true"], "host": "h1", "queue": "q1", "priority": "low"}
    scripts = sc.Scripts(r)
    one = scripts.run(sc.submit(keys, "0" * 26, "admin", {"kind": "shell", "queue": "q1",
                                                           "priority": 3, "host": "h1"},
                                events_maxlen=1000))
    assert one[0] == 1
    jobs = client.post("/jobs", json=[sub, sub]).json()["jobs"]
    for job in jobs:
        h = r.hgetall(keys.job(job["id"]))
        assert h["state"] == "pending" and h["attempt"] == "0" and h["owner"] == "admin"
        assert h["seq"] == "1" and h["queue"] == "q1" and h["host"] == "h1"
        assert h["priority"] == "3" and int(h["created_at"]) > 0
    seqs = [int(r.hget(keys.job(i), "sub_seq")) for i in ["0" * 26] + [j["id"] for j in jobs]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    entries = [fields for _, fields in r.xrange(keys.submissions())]
    assert entries[1:] == [{"id": j["id"], "q": "q1", "h": "h1", "d": "0"} for j in jobs]
    assert {k for k in entries[0]} == {"id", "q", "h", "d"}
    events = [f for _, f in r.xrange(keys.events()) if f["job"] in {j["id"] for j in jobs}]
    assert [(e["seq"], e["state"], e["by"]) for e in events] == [("1", "pending", "admin")] * 2
    assert r.hget(keys.user("admin"), "active") == "3"


# -- refusals: nothing is written -----------------------------------------------------------


def test_a_bad_job_in_a_batch_names_index_and_field_and_writes_nothing(
    client: TestClient, r: redis.Redis, keys: Keys
) -> None:
    subs = [{"command": ["true"]}] * 3 + [{"command": ["true"], "timeout": -1}, {"comand": 1}]
    resp = client.post("/jobs", json=subs)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"].startswith("[3].timeout: ")
    locs = [d["loc"] for d in error["details"]]
    assert ["body", 3, "timeout"] in locs and ["body", 4, "comand"] in locs
    assert r.xlen(keys.submissions()) == 0 and job_keys(r, keys) == []


def test_a_batch_over_the_user_limit_is_refused_whole(
    limited: TestClient, r: redis.Redis, keys: Keys
) -> None:
    assert limited.post("/jobs", json=[{"command": ["true"]}] * 2).status_code == 202
    resp = limited.post("/jobs", json=[{"command": ["true"]}] * 2)  # 2 + 2 > 3
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert error["code"] == "limit_exceeded" and "max_active_per_user" in error["message"]
    assert error["details"] == {"limit": "max_active_per_user", "max": 3, "count": 2,
                                "accepted": []}
    assert r.xlen(keys.submissions()) == 2 and len(job_keys(r, keys)) == 2
    assert limited.post("/jobs", json={"command": ["true"]}).status_code == 202  # 3 fits


def test_a_batch_over_a_queue_limit_names_the_queue(
    settings: Settings, r: redis.Redis, keys: Keys
) -> None:
    r.zadd(keys.queue("small"), {"a": 1, "b": 2})
    with app_client(settings, max_queue_size=3) as c:
        resp = c.post("/jobs", json=[{"command": ["true"]},
                                     {"command": ["true"], "queue": "small"},
                                     {"command": ["true"], "queue": "small"}])
        assert resp.status_code == 429
        error = resp.json()["error"]
        assert error["details"]["queue"] == "small" and error["details"]["count"] == 2
        assert "queue small" in error["message"]
        assert r.xlen(keys.submissions()) == 0
        assert c.post("/jobs", json={"command": ["true"], "queue": "small"}).status_code == 202


def test_duplicates_do_not_count_against_the_limit(limited: TestClient) -> None:
    subs = [{"command": ["true"], "idempotency_key": f"k{i}"} for i in range(3)]
    first = limited.post("/jobs", json=subs)
    assert first.status_code == 202
    again = limited.post("/jobs", json=subs)  # at the limit, but nothing new
    assert again.status_code == 202
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]


def test_redis_down_is_a_503_for_a_batch(settings: Settings) -> None:
    with app_client(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0") as c:
        resp = c.post("/jobs", json=[{"command": ["true"]}] * 2)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "redis_unavailable"


# -- batches of more than one call ------------------------------------------------------------


def test_a_batch_of_several_calls_keeps_order(
    client: TestClient, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_route, "SUBMIT_CALL_JOBS", 2)
    monkeypatch.setattr(validate, "SUBMIT_CALL_JOBS", 2)
    subs = [{"command": ["echo", str(i)], "idempotency_key": f"s{i % 4}"} for i in range(5)]
    jobs = client.post("/jobs", json=subs).json()["jobs"]
    assert [j["command"] for j in jobs[:4]] == [["echo", str(i)] for i in range(4)]
    assert jobs[4]["id"] == jobs[0]["id"]  # its key was taken by a call before
    assert [f["id"] for _, f in r.xrange(keys.submissions())] == [j["id"] for j in jobs[:4]]


def test_a_later_call_refused_lists_what_was_accepted(
    settings: Settings, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_route, "SUBMIT_CALL_JOBS", 2)
    monkeypatch.setattr(validate, "SUBMIT_CALL_JOBS", 100)  # no pre-check: a race
    with app_client(settings, max_active_per_user=3) as c:
        resp = c.post("/jobs", json=[{"command": ["true"]}] * 4)
    assert resp.status_code == 429
    details = resp.json()["error"]["details"]
    assert details["limit"] == "max_active_per_user" and details["count"] == 2
    assert details["accepted"] == [f["id"] for _, f in r.xrange(keys.submissions())]
    assert len(details["accepted"]) == 2


def test_a_batch_of_several_calls_is_checked_whole_first(
    settings: Settings, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_route, "SUBMIT_CALL_JOBS", 2)
    monkeypatch.setattr(validate, "SUBMIT_CALL_JOBS", 2)
    with app_client(settings, max_active_per_user=3) as c:
        resp = c.post("/jobs", json=[{"command": ["true"]}] * 4)
    assert resp.status_code == 429
    assert "accepted" not in resp.json()["error"]["details"]
    assert r.xlen(keys.submissions()) == 0


# -- parts ------------------------------------------------------------------------------------


def test_job_ids_are_ulids_in_order() -> None:
    gen = jobs_route.JobIds()
    ids = gen.take(3) + gen.take(1) + gen.take(1000)
    assert all(re.fullmatch(r"[0-9a-z]{26}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(str(ULID.from_str(i.upper())).lower() == i for i in ids)
    values = [int(ULID.from_str(i.upper())) for i in ids]
    assert abs(ULID.from_str(ids[0].upper()).milliseconds - ULID().milliseconds) < 5000
    # the 20-bit boundary where the shared head of the ids changes
    gen._ms, gen._last = 1 << 47, (1 << 20) - 2
    values = [int(ULID.from_str(i.upper())) for i in gen.take(4)]
    assert [v - values[0] for v in values] == [0, 1, 2, 3]
    assert values[0] >> 80 == 1 << 47


def test_idempotency_ttl_is_the_scripts_default() -> None:
    assert sc.submit.__kwdefaults__["idempotency_ttl_s"] == jobs_route.IDEMPOTENCY_TTL_S


@pytest.mark.parametrize("args", [
    ("SET", "a", 1), ("CLIENT SETNAME", "x"), (b"CONFIG GET", b"x"),
    ("EVALSHA", "s", 2, "k1", "k2", 0.1, 1e20, -5, "ü", b"\x00\xff", ""),
    ("SET", memoryview(b"ab"), bytearray(b"c")),
])
def test_hiredis_packing_sends_what_redis_py_sends(args: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    assert b"".join(_HiredisPacking().pack_command(*args)) == b"".join(
        Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [None, True, [1], {"a": 1}])
def test_hiredis_packing_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(redis.exceptions.DataError):
        _HiredisPacking().pack_command("SET", "k", bad)
