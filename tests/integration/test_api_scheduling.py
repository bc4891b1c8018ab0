"""The scheduling rules as the REST API shows them: validation, limits, explanations."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from api.app import create_app
from common.keys import Keys
from common.settings import Settings
from tests.integration.conftest import ADMIN, ADMIN_TOKEN
from tests.integration.harness import Harness


def test_unknown_dependency_is_a_422_naming_the_field(client: TestClient) -> None:
    resp = client.post("/jobs", json={"command": ["true"], "depends_on": ["0" * 26]})
    assert resp.status_code == 422
    body = resp.json()["error"]
    assert body["message"].startswith("depends_on.0:")
    assert body["details"][0]["loc"] == ["body", "depends_on", 0]


def test_another_users_job_cannot_be_depended_on(client: TestClient) -> None:
    bob = client.post("/tokens", json={"user": "bob"}).json()["token"]
    mine = client.post("/jobs", json={"command": ["true"]}).json()["id"]
    resp = client.post("/jobs", json={"command": ["true"], "depends_on": [mine]},
                       headers={"Authorization": f"Bearer {bob}"})
    assert resp.status_code == 422
    ok = client.post("/jobs", json={"command": ["true"], "depends_on": [{"id": mine,
                                                                           "on": "any"}]})
    assert ok.status_code == 202


def test_a_job_larger_than_allowed_is_a_422(client: TestClient) -> None:
    resp = client.post("/jobs", json={"command": ["true"], "resources": {"cpu": 100000}})
    assert resp.status_code == 422
    assert resp.json()["error"]["message"].startswith("resources.cpu:")


def test_over_the_user_limit_is_a_429_naming_it(settings: Settings, r: redis.Redis) -> None:
    app = create_app(settings.model_copy(update={"token": ADMIN_TOKEN,
                                                 "max_active_per_user": 2}))
    with TestClient(app, headers=ADMIN) as c:
        assert c.post("/jobs", json=[{"command": ["true"]}] * 2).status_code == 202
        resp = c.post("/jobs", json={"command": ["true"]})
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert "max_active_per_user" in error["message"]
    assert error["details"]["count"] == 2


def test_a_waiting_job_says_why_in_detail(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    h = Harness(r, keys, settings)
    first = client.post("/jobs", json={"command": ["true"], "host": "hv7"}).json()["id"]
    second = client.post("/jobs", json={"command": ["true"], "host": "hv7"}).json()["id"]
    plain = [client.post("/jobs", json={"command": ["true"]}).json()["id"] for _ in range(2)]
    h.step()
    job = client.get(f"/jobs/{second}").json()
    assert job["wait_reason"] == "host:hv7"
    assert job["wait_detail"] == {"host": "hv7", "holder": first, "position": 1, "waiters": 1}
    job = client.get(f"/jobs/{plain[1]}").json()
    assert job["wait_reason"] == "priority"
    assert job["wait_detail"]["position"] == 3  # behind the host's holder and plain[0]
    hosts = client.get("/hosts").json()
    assert hosts == [{"host": "hv7", "holder": first, "waiters": [second], "waiting": 1}]


def test_retry_runs_a_finished_job_again(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    h = Harness(r, keys, settings)
    job = client.post("/jobs", json={"command": ["false"]}).json()["id"]
    assert client.post(f"/jobs/{job}/retry").status_code == 409  # not finished yet
    h.worker("w1", slots=1)
    h.step()
    h.take("w1")
    h.finish(job, "failed", 1)
    resp = client.post(f"/jobs/{job}/retry")
    assert resp.status_code == 202 and resp.json()["state"] == "pending"
    h.step()
    assert h.take("w1") == [job]
    assert h.field(job, "attempt") == "2"
    assert h.finish(job) == "completed"


def test_schedules_are_created_listed_and_removed(client: TestClient) -> None:
    bad = client.post("/schedules", json={"name": "n", "cron": "every day",
                                          "job": {"command": ["true"]}})
    assert bad.status_code == 422
    made = client.post("/schedules", json={"name": "nightly", "cron": "0 3 * * *",
                                           "job": {"command": ["make", "backup"]}})
    assert made.status_code == 201
    assert "T03:00:00" in made.json()["next_fire_at"]
    assert client.post("/schedules", json={"name": "nightly", "cron": "0 3 * * *",
                                           "job": {"command": ["true"]}}).status_code == 409
    assert [s["name"] for s in client.get("/schedules").json()] == ["nightly"]
    assert client.delete("/schedules/nightly").status_code == 204
    assert client.delete("/schedules/nightly").status_code == 404
