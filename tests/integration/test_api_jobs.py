"""POST/GET/DELETE /jobs and GET /jobs (the SQL mirror) against the real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from common.clock import now_ms
from common.db import make_engine
from common.jobs import new_job_id
from common.keys import Keys
from common.settings import Settings
from common.tables import JobRecord


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings)  # the same SQLite file as the app's
    try:
        yield eng
    finally:
        eng.dispose()


def bearer(client: TestClient, user: str, admin: bool = False) -> dict[str, str]:
    resp = client.post("/tokens", json={"user": user, "admin": admin})
    assert resp.status_code == 201, resp.text
    assert resp.json()["user"] == user and resp.json()["admin"] is admin
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def submitted_ids(r: redis.Redis, keys: Keys) -> list[str]:
    return [fields["id"] for _, fields in r.xrange(keys.submissions())]


# -- submit ---------------------------------------------------------------------------------


def test_submit_one(client: TestClient, r: redis.Redis, keys: Keys) -> None:
    resp = client.post(
        "/jobs",
        json={"command": ["sh", "-c", "make test"], "priority": "high", "queue": "build",
              "env": {"CI": "1"}, "tags": {"team": "infra"}, "host": "hv-07"},
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["state"] == "pending" and job["owner"] == "admin"
    assert job["priority"] == "high" and job["queue"] == "build" and job["host"] == "hv-07"
    assert job["command"] == ["sh", "-c", "make test"] and job["env"] == {"CI": "1"}
    assert job["created_at"].endswith("Z")
    h = r.hgetall(keys.job(job["id"]))
    assert h["state"] == "pending" and h["owner"] == "admin" and h["queue"] == "build"
    assert h["priority"] == "1"
    assert submitted_ids(r, keys) == [job["id"]]
    # an unfinished job's GET also says when to ask again (tests/integration/test_api_live.py)
    assert client.get(f"/jobs/{job['id']}").json() == job | {"poll_after_ms": 1000}


def test_submit_batch_keeps_order(client: TestClient, r: redis.Redis, keys: Keys) -> None:
    subs = [{"command": ["echo", str(i)]} for i in range(5)]
    subs.append({"kind": "python", "function": "common.tasks:echo", "args": [1, {"a": 2}]})
    resp = client.post("/jobs", json=subs)
    assert resp.status_code == 202, resp.text
    jobs = resp.json()["jobs"]
    assert [j["command"] for j in jobs[:5]] == [["echo", str(i)] for i in range(5)]
    assert jobs[5]["kind"] == "python" and jobs[5]["args"] == [1, {"a": 2}]
    ids = [j["id"] for j in jobs]
    assert len(set(ids)) == 6
    assert submitted_ids(r, keys) == ids
    assert all(r.hget(keys.job(i), "state") == "pending" for i in ids)


def test_idempotency_key_returns_the_first_job(client: TestClient, r: redis.Redis, keys: Keys
                                               ) -> None:
    first = client.post("/jobs", json={"command": "true", "idempotency_key": "deploy-4711"})
    again = client.post("/jobs", json={"command": "true", "idempotency_key": "deploy-4711"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    batch = client.post("/jobs", json=[{"command": "a", "idempotency_key": "k2"},
                                       {"command": "b", "idempotency_key": "k2"},
                                       {"command": "c", "idempotency_key": "deploy-4711"}])
    a, b, c = batch.json()["jobs"]
    assert a["id"] == b["id"] and b["command"] == "a"
    assert c["id"] == first.json()["id"]
    assert submitted_ids(r, keys) == [first.json()["id"], a["id"]]


def test_idempotency_keys_are_per_user(client: TestClient) -> None:
    alice, bob = bearer(client, "alice"), bearer(client, "bob")
    body = {"command": "true", "idempotency_key": "same"}
    a = client.post("/jobs", json=body, headers=alice).json()
    b = client.post("/jobs", json=body, headers=bob).json()
    assert a["id"] != b["id"] and (a["owner"], b["owner"]) == ("alice", "bob")


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_pending_then_again_is_409(client: TestClient, r: redis.Redis, keys: Keys) -> None:
    job_id = client.post("/jobs", json={"command": "sleep 100"}).json()["id"]
    resp = client.delete(f"/jobs/{job_id}")
    assert resp.status_code == 202, resp.text
    assert resp.json()["state"] == "cancelled" and resp.json()["finished_at"]
    assert r.hget(keys.job(job_id), "state") == "cancelled"
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409
    assert again.json()["error"] == {
        "code": "conflict",
        "message": f"job {job_id} already finished (cancelled)",
        "details": {"state": "cancelled"},
    }


def test_cancel_running_asks_the_worker(client: TestClient, r: redis.Redis, keys: Keys) -> None:
    job_id = client.post("/jobs", json={"command": "sleep 100"}).json()["id"]
    r.hset(keys.job(job_id), mapping={"state": "running", "worker": "w1"})
    resp = client.delete(f"/jobs/{job_id}")
    assert resp.status_code == 202
    assert resp.json()["state"] == "running"  # the worker finishes it as cancelled
    assert r.hget(keys.job(job_id), "cancel") == "1"


def _record(engine: Engine, **kw: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": new_job_id(), "owner": "alice", "queue": "default", "state": "completed",
        "kind": "shell", "created_at": now_ms(),
        "spec": orjson.dumps({"command": ["true"]}).decode(),
    }
    values.update(kw)
    rec = JobRecord(**values)
    with Session(engine) as session:
        session.add(rec)
        session.commit()
        session.refresh(rec)
    return rec


def test_mirror_only_job_reads_and_cannot_be_cancelled(client: TestClient, engine: Engine) -> None:
    rec = _record(engine, owner="admin", exit_code=0, finished_at=now_ms())
    job = client.get(f"/jobs/{rec.id}").json()
    assert job["state"] == "completed" and job["exit_code"] == 0 and job["command"] == ["true"]
    resp = client.delete(f"/jobs/{rec.id}")
    assert resp.status_code == 409
    assert resp.json()["error"]["message"] == f"job {rec.id} already finished (completed)"


def test_cancel_unknown_is_404(client: TestClient) -> None:
    assert client.delete(f"/jobs/{new_job_id()}").json()["error"]["code"] == "not_found"


# -- owners ---------------------------------------------------------------------------------


def test_user_sees_only_own_jobs(client: TestClient, engine: Engine) -> None:
    alice, bob = bearer(client, "alice"), bearer(client, "bob")
    mine = client.post("/jobs", json={"command": "true"}, headers=alice).json()
    assert mine["owner"] == "alice"
    assert client.get(f"/jobs/{mine['id']}", headers=alice).status_code == 200
    assert client.get(f"/jobs/{mine['id']}", headers=bob).status_code == 404
    assert client.get(f"/jobs/{mine['id']}").status_code == 200  # the admin sees all
    old = _record(engine, owner="alice")
    assert client.get(f"/jobs/{old.id}", headers=bob).status_code == 404
    assert client.get(f"/jobs/{old.id}", headers=alice).status_code == 200


def test_user_admin_token_acts_as_admin(client: TestClient) -> None:
    ops = bearer(client, "ops", admin=True)
    assert client.post("/tokens", json={"user": "x"}, headers=ops).status_code == 201


# -- list (SQL mirror + live overlay) -------------------------------------------------------


def test_list_filters_and_owner_restriction(client: TestClient, engine: Engine) -> None:
    a1 = _record(engine, owner="alice", queue="gpu", state="completed", host="hv-1")
    a2 = _record(engine, owner="alice", queue="default", state="failed")
    b1 = _record(engine, owner="bob", queue="gpu", state="completed", host="hv-1")
    alice = bearer(client, "alice")

    def ids(params: dict[str, Any], headers: dict[str, str] | None = None) -> set[str]:
        resp = client.get("/jobs", params=params, headers=headers)
        assert resp.status_code == 200, resp.text
        return {j["id"] for j in resp.json()["jobs"]}

    assert ids({}) == {a1.id, a2.id, b1.id}
    assert ids({}, alice) == {a1.id, a2.id}
    assert ids({"owner": "bob"}, alice) == {a1.id, a2.id}  # a user cannot look at others
    assert ids({"owner": "bob"}) == {b1.id}
    assert ids({"queue": "gpu"}) == {a1.id, b1.id}
    assert ids({"state": "failed"}) == {a2.id}
    assert ids({"host": "hv-1", "owner": "alice"}) == {a1.id}


def test_list_overlays_live_state(client: TestClient, engine: Engine, r: redis.Redis,
                                  keys: Keys) -> None:
    live = client.post("/jobs", json={"command": "true"}).json()
    _record(engine, id=live["id"], owner="admin", state="pending")  # the recorder's copy
    r.hset(keys.job(live["id"]), "state", "running")
    [job] = client.get("/jobs").json()["jobs"]
    assert job["state"] == "running"
    assert client.get("/jobs", params={"state": "pending"}).json()["jobs"] == []


def test_list_paginates_by_cursor_newest_first(client: TestClient, engine: Engine) -> None:
    made = sorted((_record(engine).id for _ in range(7)), reverse=True)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == seen[-1]
    assert seen == made
    assert pages == 3
