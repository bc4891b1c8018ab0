"""The cheaper submit and wait paths (docs/performance.md, "API"): the batch's specs made
in one pydantic call, the answers built from plain dicts while Redis runs submit.lua, the
hot routes authenticating without FastAPI's dependency chain, and the until=finished
long-poll reading the job hash once per wake-up. Each must answer what the plain way
answered."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api import watch as watch_module
from common.jobs import submission_fields, submission_specs
from common.keys import Keys
from common.models import JobSubmission
from common.settings import Settings
from tests.integration.harness import Harness
from tests.integration.test_api_live import long_poll_until_finished
from tests.support import wait_for

# submissions whose spec (defaults left out) differs from their document in a nested model
# or in a field the document does not show
TRICKY: list[dict[str, Any]] = [
    {"command": ["true"], "resources": {"cpu": 0}},  # a nested model equal to its default
    {"command": ["true"], "resources": {"memory_mb": 64}},  # partly given
    {"command": ["true"], "resources": {"cpu": 2, "memory_mb": 0, "gpu": 1}},
    {"command": ["true"], "retry_delay": 7, "retry_backoff": 3, "retry_max_delay": 60},
    {"command": "echo hi", "priority": "normal", "queue": "default", "kind": "shell"},
    {"kind": "python", "function": "common.tasks:echo", "args": [], "kwargs": {"a": None}},
    {"command": ["true"], "timeout": 5, "stale_after": 9, "tags": {"t": "1"}},
    {"command": ["true"], "scheduled_at": "2031-05-06T07:08:09+02:00"},
]


def test_bulk_specs_and_fields_are_what_one_job_at_a_time_gives() -> None:
    subs = [JobSubmission.model_validate(s) for s in TRICKY]
    subs.append(JobSubmission.model_validate(
        {"command": ["true"], "depends_on": ["a1", {"id": "b2", "on": "success"},
                                             {"id": "c3", "on": "any"}]}))
    subs.append(JobSubmission(command=["x"]).model_copy(update={"queue": "q", "retries": 0}))
    assigned = JobSubmission(command=["x"])
    assigned.priority = "high"
    subs.append(assigned)
    specs = submission_specs(subs)
    assert specs == [s.model_dump(mode="json", exclude_defaults=True) for s in subs]
    for spec, sub in zip(specs, subs, strict=True):  # the same order of fields, too
        assert list(spec) == list(sub.model_dump(mode="json", exclude_defaults=True))
    for sub, spec in zip(subs, specs, strict=True):
        assert submission_fields(sub, 3600.0, spec) == submission_fields(sub, 3600.0)
        assert submission_fields(sub, None, spec) == submission_fields(sub)


def test_tricky_batch_documents_are_what_get_shows(client: TestClient) -> None:
    dep = client.post("/jobs", json={"command": ["true"]}).json()["id"]
    subs = [*TRICKY, {"command": ["true"], "depends_on": [{"id": dep, "on": "success"}]},
            {"command": ["true"], "depends_on": [dep]}]
    resp = client.post("/jobs", json=subs)
    assert resp.status_code == 202, resp.text
    jobs = resp.json()["jobs"]
    for job in jobs:
        got = client.get(f"/jobs/{job['id']}").json()
        got.pop("poll_after_ms")
        assert job == got
    assert jobs[0]["resources"] == {"cpu": 0.0, "memory_mb": 0, "gpu": 0}
    assert jobs[1]["resources"] == {"cpu": 0.0, "memory_mb": 64, "gpu": 0}
    assert "retry_delay" not in jobs[3] and "retry_backoff" not in jobs[3]
    assert jobs[8]["depends_on"] == [{"id": dep, "on": "success"}]
    assert jobs[9]["depends_on"] == [dep]


def test_one_tricky_job_answers_its_document(client: TestClient) -> None:
    for sub in TRICKY:
        job = client.post("/jobs", json=sub).json()
        assert client.get(f"/jobs/{job['id']}").json() == job | {"poll_after_ms": 1000}


@pytest.mark.parametrize("overlap_from", [1, 1000])
def test_a_batch_of_many_calls_answers_in_order(
    client: TestClient, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
    overlap_from: int,
) -> None:
    """A batch cut into several submit.lua calls (the first overlapped with building the
    answer or not, the others after it) answers every job, in request order."""
    from api.routes import jobs as jobs_route

    monkeypatch.setattr(jobs_route, "SUBMIT_CALL_JOBS", 3)
    monkeypatch.setattr(jobs_route, "OVERLAP_JOBS", overlap_from)
    subs = [{"command": ["echo", str(i)]} for i in range(8)]
    jobs = client.post("/jobs", json=subs).json()["jobs"]
    assert [j["command"] for j in jobs] == [s["command"] for s in subs]
    assert r.xlen(keys.submissions()) == 8
    assert all(j["created_at"] for j in jobs)


# -- authentication of the hot routes ---------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer  ", "Basic abc", "Bearer wrong"])
def test_hot_routes_refuse_bad_tokens_with_401_first(
    settings: Settings, r: redis.Redis, auth: str | None
) -> None:
    """POST /jobs and GET /jobs/{id} authenticate before anything else, bad query or body
    included, with the envelope (as the routes on PrincipalDep do)."""
    from api.app import create_app

    app = create_app(settings.model_copy(update={"token": "admintoken"}))
    headers = {"Authorization": auth} if auth is not None else {}
    with TestClient(app) as c:
        for resp in (c.post("/jobs", json={"comand": 1}, headers=headers),
                     c.get("/jobs/" + "0" * 26, params={"wait": 999}, headers=headers)):
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "unauthorized"


def test_openapi_keeps_bearer_security_on_the_hot_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/jobs"]["post"]["security"] == [{"HTTPBearer": []}]
    assert paths["/jobs/{job_id}"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "requestBody" in paths["/jobs"]["post"]


# -- until=finished -------------------------------------------------------------------------


def test_until_finished_ended_early_answers_the_latest_state(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wait that ends before the job finished (here: the server stopping) answers the
    document as it stands then, not the one read when the wait began."""
    monkeypatch.setattr(watch_module, "RECHECK_S", 0.05)
    h = Harness(r, keys, settings)
    job_id = client.post("/jobs", json={"command": ["true"]}).json()["id"]
    poller, answer, watch = long_poll_until_finished(client, job_id)
    h.worker("w1", slots=1)
    h.step()
    assert h.take("w1", "default") == [job_id]  # running now
    wait_for(lambda: r.hget(keys.job(job_id), "state") == "running", what="running")
    wait_for(lambda: job_id in watch.waiters, what="the request to wait again")
    client.app.state.stopping.set()  # type: ignore[attr-defined]
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert answer["status"] == 200
    assert answer["body"]["state"] == "running"
    assert answer["body"]["poll_after_ms"] == 1000


def test_until_finished_sleeps_through_the_jobs_transitions(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long-poll until=finished is woken by the job's end only (the finished stream's
    reader; the events stream's does not even run): its queued, dispatched and running
    events cost the API no read of the job (counted on the server)."""
    monkeypatch.setattr(watch_module, "RECHECK_S", 600.0)  # no periodic look in this test
    h = Harness(r, keys, settings)
    job_id = client.post("/jobs", json={"command": ["true"]}).json()["id"]

    def calls(command: str) -> int:
        stats = r.info("commandstats").get(f"cmdstat_{command}")
        return int(stats["calls"]) if stats else 0

    before = calls("hgetall")  # only the API reads whole hashes (no script does)
    poller, answer, watch = long_poll_until_finished(client, job_id)
    h.worker("w1", slots=1)
    h.step()  # queued, dispatched
    assert h.take("w1", "default") == [job_id]  # running
    reading = {reader.stream: reader.task is not None and not reader.task.done()
               for reader in watch.readers.values()}
    assert reading == {keys.events(): False, keys.finished(): True}
    hgetall_mid = calls("hgetall")
    h.finish(job_id)
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert answer["status"] == 200 and answer["body"]["state"] == "completed"
    # the request reads the job when it begins and when it answers; none at the transitions
    assert hgetall_mid - before == 1
    assert calls("hgetall") - before == 2


# -- submit.lua batch mode: fixed fields by position, one default stale_after -------------------


def test_batch_hashes_hold_every_field_and_the_default_stale_after(
    client: TestClient, r: redis.Redis, keys: Keys, settings: Settings
) -> None:
    dep = client.post("/jobs", json={"command": ["true"]}).json()["id"]
    subs = [{"kind": "python", "function": "common.tasks:noop"},
            {"command": ["true"], "stale_after": 9, "host": "h1", "retries": 2,
             "priority": "low", "queue": "q1", "depends_on": [dep]},
            {"command": ["true"], "resources": {"cpu": 1.5}, "idempotency_key": "k-9"}]
    jobs = client.post("/jobs", json=subs).json()["jobs"]
    plain, gated, sized = (r.hgetall(keys.job(j["id"])) for j in jobs)
    default_ms = str(int(settings.stale_after_s * 1000))
    assert (plain["kind"], plain["queue"], plain["priority"], plain["retries"]) == (
        "python", "default", "2", "0")
    assert plain["spec"] == '{"kind":"python","function":"common.tasks:noop"}'
    assert plain["stale_after"] == default_ms and "host" not in plain
    assert (gated["stale_after"], gated["host"], gated["ndeps"]) == ("9000", "h1", "1")
    assert (gated["queue"], gated["priority"], gated["retries"]) == ("q1", "3", "2")
    assert (sized["res_cpu"], sized["idempotency_key"]) == ("1.5", "k-9")
    assert sized["stale_after"] == default_ms
    entries = [f for _, f in r.xrange(keys.submissions())][1:]
    assert entries == [{"id": jobs[0]["id"], "q": "default", "h": "", "d": "0"},
                       {"id": jobs[1]["id"], "q": "q1", "h": "h1", "d": "1"},
                       {"id": jobs[2]["id"], "q": "default", "h": "", "d": "0"}]


def test_no_default_stale_after_writes_none(settings: Settings, r: redis.Redis,
                                            keys: Keys) -> None:
    from api.app import create_app
    from tests.integration.conftest import ADMIN, ADMIN_TOKEN

    app = create_app(settings.model_copy(update={"token": ADMIN_TOKEN, "stale_after_s": 0}))
    with TestClient(app, headers=ADMIN) as c:
        jobs = c.post("/jobs", json=[{"command": ["a"]}, {"command": ["b"], "stale_after": 2}]
                      ).json()["jobs"]
    assert r.hget(keys.job(jobs[0]["id"]), "stale_after") is None
    assert r.hget(keys.job(jobs[1]["id"]), "stale_after") == "2000"


def test_a_large_batch_with_idempotency_keys_answers_the_first_jobs(client: TestClient) -> None:
    """Past OVERLAP_JOBS (documents built before Redis answered): a job deduplicated to an
    earlier one, in the same batch or a former request, answers that job's document."""
    from api.routes import jobs as jobs_route

    n = jobs_route.OVERLAP_JOBS + 10
    subs = [{"command": ["echo", str(i)]} for i in range(n)]
    subs[0]["idempotency_key"] = subs[-1]["idempotency_key"] = "same"
    first = client.post("/jobs", json=subs).json()["jobs"]
    assert first[-1] == first[0] and first[-1]["command"] == ["echo", "0"]
    assert len({j["id"] for j in first}) == n - 1
    again = client.post("/jobs", json=[{"command": ["other"], "idempotency_key": "same"}] * n
                        ).json()["jobs"]
    assert again == [first[0]] * n
