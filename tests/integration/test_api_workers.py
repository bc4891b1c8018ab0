"""GET /workers from hand-written heartbeat hashes, and the health endpoints."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from common.keys import Keys

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def test_workers_lists_live_hashes_and_drops_expired(client: TestClient, r: redis.Redis,
                                                     keys: Keys) -> None:
    r.hset(keys.worker("w-b"), mapping={
        "hostname": "node-7", "pid": 4242, "queues": "default,gpu", "slots": 4,
        "running": "01aaaaaaaaaaaaaaaaaaaaaaaa,01bbbbbbbbbbbbbbbbbbbbbbbb",
        "started_at": T0, "last_heartbeat": T0 + 2000,
    })
    r.pexpire(keys.worker("w-b"), 60_000)
    r.hset(keys.worker("w-a"), mapping={"hostname": "node-1", "pid": 7, "queues": "default",
                                        "slots": 1, "running": "", "started_at": T0,
                                        "last_heartbeat": T0})
    r.zadd(keys.workers(), {"w-b": T0 + 2000, "w-a": T0, "w-dead": T0 - 60_000})

    resp = client.get("/workers")
    assert resp.status_code == 200, resp.text
    a, b = resp.json()
    assert b == {
        "id": "w-b", "hostname": "node-7", "pid": 4242, "queues": ["default", "gpu"],
        "slots": 4, "running": ["01aaaaaaaaaaaaaaaaaaaaaaaa", "01bbbbbbbbbbbbbbbbbbbbbbbb"],
        "last_heartbeat": "2026-01-01T00:00:02Z", "started_at": "2026-01-01T00:00:00Z",
    }
    assert a["id"] == "w-a" and a["running"] == [] and a["queues"] == ["default"]
    assert r.zrange(keys.workers(), 0, -1) == ["w-a", "w-b"]  # the dead one is forgotten


def test_no_workers(client: TestClient) -> None:
    assert client.get("/workers").json() == []


def test_health(client: TestClient) -> None:
    for path in ("/healthz", "/readyz"):
        resp = client.get(path, headers={"Authorization": ""})
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "ok" and body["redis"] is True and body["database"] is True
        assert body["version"]
