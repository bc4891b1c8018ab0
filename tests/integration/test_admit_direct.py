"""Direct admission: a lone POST /jobs without host or dependencies is queued by submit.lua
itself and, when the published capacity has a free slot and it is the queue's head,
dispatched too, so it reaches a worker without a scheduler. No scheduler runs in these
tests: what is queued or dispatched here, submit.lua did. Everything else (batches, hosts,
dependencies, the setting off) still goes through the submissions stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from common import scripts as sc
from common.keys import Keys
from common.settings import Settings
from tests.integration.conftest import ADMIN, ADMIN_TOKEN


@pytest.fixture
def api(settings: Settings, r: redis.Redis) -> Iterator[TestClient]:
    on = settings.model_copy(update={"token": ADMIN_TOKEN, "admit_direct": True})
    with TestClient(create_app(on), headers=ADMIN) as c:
        yield c


def publish_capacity(r: redis.Redis, keys: Keys, queue: str = "default", slots: int = 2,
                     cpu: float = 4.0) -> None:
    """What a scheduler publishes for the workers' own dispatch (scheduler/duties.py)."""
    cap = sc.Capacity(slots=slots, cpu=cpu, memory_mb=4096, gpu=0, max_cpu=cpu,
                      max_memory_mb=4096, max_gpu=0)
    r.hset(keys.capacity(queue), mapping=asdict(cap))


def submit(api: TestClient, body: Any) -> Any:
    resp = api.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def states(r: redis.Redis, keys: Keys, job_id: str) -> list[str]:
    return [f["state"] for _, f in r.xrange(keys.events()) if f["job"] == job_id]


def submissions(r: redis.Redis, keys: Keys) -> list[str]:
    return [f["id"] for _, f in r.xrange(keys.submissions())]


def test_lone_job_is_dispatched_by_its_submit(api: TestClient, r: redis.Redis,
                                              keys: Keys) -> None:
    publish_capacity(r, keys)
    job_id = submit(api, {"command": ["true"]})["id"]
    h = r.hgetall(keys.job(job_id))
    assert h["state"] == "dispatched" and h["admitted_at"] and h["dispatched_at"]
    assert states(r, keys, job_id) == ["pending", "queued", "dispatched"]
    assert [f["id"] for _, f in r.xrange(keys.dispatch("default"))] == [job_id]
    assert r.xrange(keys.dispatch("default"))[0][0] == h["dispatch_id"]
    assert submissions(r, keys) == []
    assert r.zcard(keys.queue("default")) == 0
    assert r.zscore(keys.stale(), job_id) is None  # dispatched: no longer can go stale
    assert "default" in r.smembers(keys.queues())
    assert api.get(f"/jobs/{job_id}").json()["state"] == "dispatched"


def test_without_capacity_it_is_queued_as_admit_would(api: TestClient, r: redis.Redis,
                                                      keys: Keys, settings: Settings) -> None:
    job_id = submit(api, {"command": ["true"], "priority": "high", "queue": "builds",
                          "stale_after": 60})["id"]
    h = r.hgetall(keys.job(job_id))
    assert h["state"] == "queued" and h["wait_reason"] == "priority"
    step = int(settings.priority_step_s * 1000)
    expected = int(h["created_at"]) + int(h["priority"]) * step
    assert r.zscore(keys.queue("builds"), job_id) == expected == float(h["score"])
    assert r.zscore(keys.stale(), job_id) == int(h["created_at"]) + 60_000
    assert "builds" in r.smembers(keys.queues())
    assert states(r, keys, job_id) == ["pending", "queued"]
    assert submissions(r, keys) == [] and r.xlen(keys.dispatch("builds")) == 0


def test_only_the_queue_head_and_only_free_slots(api: TestClient, r: redis.Redis,
                                                 keys: Keys) -> None:
    publish_capacity(r, keys, slots=1)
    first = submit(api, {"command": ["true"], "priority": "low"})["id"]
    assert r.hget(keys.job(first), "state") == "dispatched"
    # no free slot left (the one slot's job is in the dispatch stream): queued
    second = submit(api, {"command": ["true"], "priority": "low"})["id"]
    assert r.hget(keys.job(second), "state") == "queued"
    # a slot frees up, but a better job waits ahead of this one: it stays queued
    r.xdel(keys.dispatch("default"), r.hget(keys.job(first), "dispatch_id"))
    third = submit(api, {"command": ["true"], "priority": "background"})["id"]
    assert r.hget(keys.job(third), "state") == "queued"
    assert r.zrange(keys.queue("default"), 0, -1) == [second, third]


def test_what_it_holds_back(api: TestClient, r: redis.Redis, keys: Keys) -> None:
    publish_capacity(r, keys, cpu=2.0)
    big = submit(api, {"command": ["true"], "resources": {"cpu": 3}})["id"]
    assert r.hgetall(keys.job(big))["wait_reason"] == "resources"
    later = submit(api, {"command": ["true"], "scheduled_at": "2099-01-01T00:00:00Z"})["id"]
    h = r.hgetall(keys.job(later))
    assert (h["state"], h["wait_reason"]) == ("queued", "scheduled_at")
    assert r.zscore(keys.delayed(), later) is not None
    assert r.zscore(keys.queue("default"), later) is None


def test_the_rest_goes_through_a_scheduler(api: TestClient, r: redis.Redis, keys: Keys,
                                           settings: Settings) -> None:
    publish_capacity(r, keys)
    hosted = submit(api, {"command": ["true"], "host": "hv-1"})["id"]
    dep = submit(api, {"command": ["true"]})["id"]
    waits = submit(api, {"command": ["true"], "depends_on": [dep]})["id"]
    batch = [j["id"] for j in submit(api, [{"command": ["true"]}] * 2)["jobs"]]
    with TestClient(create_app(settings.model_copy(update={
            "token": ADMIN_TOKEN, "admit_direct": False})), headers=ADMIN) as off:
        plain_off = submit(off, {"command": ["true"]})["id"]
    pending = [hosted, waits, *batch, plain_off]
    assert submissions(r, keys) == pending
    assert [r.hget(keys.job(j), "state") for j in pending] == ["pending"] * 5
