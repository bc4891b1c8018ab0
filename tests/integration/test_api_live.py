"""Watching jobs live, through the API on a real server with jobs driven by the harness
through the real Lua scripts: long-poll, events, queues, metrics, the log mirror."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, func, select

from api.routes import logs as log_routes
from api.routes import metrics as metrics_route
from common.db import make_engine
from common.keys import Keys
from common.settings import Settings
from common.tables import LogRecord
from scheduler.recorder import Recorder
from tests.integration.harness import Harness
from tests.integration.test_api_logs import follow
from tests.support import wait_for

T0 = 1_767_225_600_000


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    return Harness(r, keys, settings)


@pytest.fixture
def recorder(r: redis.Redis, settings: Settings) -> Iterator[Recorder]:
    rec = Recorder(settings, r, make_engine(settings))
    yield rec
    rec.engine.dispose()


def submit(client: TestClient, **spec: Any) -> str:
    resp = client.post("/jobs", json={"command": ["true"], **spec})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def run(h: Harness, worker: str, queue: str = "default") -> list[str]:
    h.step()
    return h.take(worker, queue)


def write_log(r: redis.Redis, keys: Keys, job_id: str, n: int) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(keys.log(job_id), {"s": "oe"[i % 2], "t": T0 + i, "l": f"line {i}"})
    return [str(eid) for eid in pipe.execute()]


# -- long-poll ------------------------------------------------------------------------------


def test_long_poll_answers_as_soon_as_the_job_changes(client: TestClient, h: Harness) -> None:
    job_id = submit(client)
    answer: dict[str, Any] = {}

    def poll() -> None:
        resp = client.get(f"/jobs/{job_id}", params={"wait": 30, "polls": 2})
        answer.update(status=resp.status_code, body=resp.json(), headers=resp.headers)

    poller = threading.Thread(target=poll)
    poller.start()
    watch = wait_for(lambda: getattr(client.app.state, "job_watch", None),  # type: ignore[attr-defined]
                     what="the long-poll to start watching")
    wait_for(lambda: job_id in watch.waiters, what="the request to wait on the job")
    h.step()  # admitted: pending → queued
    poller.join(timeout=10)
    assert not poller.is_alive(), "the long-poll did not answer when the job changed"
    assert answer["status"] == 200
    assert answer["body"]["state"] == "queued"
    assert answer["body"]["poll_after_ms"] == 4000
    assert answer["headers"]["retry-after"] == "4"
    assert job_id not in watch.waiters


def long_poll_until_finished(client: TestClient, job_id: str
                              ) -> tuple[threading.Thread, dict[str, Any], Any]:
    """GET /jobs/{id}?wait=30&until=finished in a thread, once the request waits on the
    job: (the thread, where its answer lands, the app's JobWatch)."""
    answer: dict[str, Any] = {}

    def poll() -> None:
        resp = client.get(f"/jobs/{job_id}", params={"wait": 30, "until": "finished"})
        answer.update(status=resp.status_code, body=resp.json())

    poller = threading.Thread(target=poll)
    poller.start()
    watch = wait_for(lambda: getattr(client.app.state, "job_watch", None),  # type: ignore[attr-defined]
                     what="the long-poll to start watching")
    wait_for(lambda: job_id in watch.waiters, what="the request to wait on the job")
    return poller, answer, watch


def run_and_fail_while_held(h: Harness, watch: Any, job_id: str,
                            request: threading.Thread) -> None:
    """Take the job through every transition to running (the request, held until the
    job finished, must still be waiting), then fail it with exit code 3: the request must
    answer."""
    h.worker("w1", slots=1)
    assert run(h, "w1") == [job_id]  # pending → queued → dispatched → running
    wait_for(lambda: job_id in watch.waiters, what="the request to wait again")
    assert request.is_alive(), "answered before the job finished"
    h.finish(job_id, "failed", exit_code=3)
    request.join(timeout=10)
    assert not request.is_alive(), "the request did not answer when the job finished"


def test_long_poll_until_finished_holds_through_every_transition(
    client: TestClient, h: Harness
) -> None:
    """until=finished: one request answers only with the terminal document (what the
    SDK's wait and tidal wait use: one request per job instead of one per transition)."""
    job_id = submit(client)
    poller, answer, watch = long_poll_until_finished(client, job_id)
    run_and_fail_while_held(h, watch, job_id, poller)
    assert answer["status"] == 200
    assert (answer["body"]["state"], answer["body"]["exit_code"]) == ("failed", 3)


def test_a_follow_ends_as_soon_as_a_silent_job_finishes(
    client: TestClient, h: Harness, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower blocks on the job's log stream; a job that ends without a last line
    must still end the follow at once: finish.lua's done stream wakes it (without it,
    only the end of the block would: here 60 s, past the test's deadline)."""
    monkeypatch.setattr(log_routes, "BLOCK_MS", 60_000)
    job_id = submit(client)
    h.worker("w1", slots=1)
    assert run(h, "w1") == [job_id]
    frames: list[dict[str, str]] = []
    reader = threading.Thread(target=lambda: frames.extend(follow(client, job_id)))
    reader.start()
    wait_for(lambda: any(c.get("cmd") == "xread" and "b" in c.get("flags", "")
                         for c in r.client_list()), what="the follower to block in XREAD")
    h.finish(job_id)
    reader.join(timeout=10)
    assert not reader.is_alive(), "the follow did not end when the job finished"
    assert [f["event"] for f in frames] == ["end"]
    assert orjson.loads(frames[0]["data"])["state"] == "completed"


def test_long_poll_times_out_with_the_same_state(client: TestClient) -> None:
    job_id = submit(client)
    resp = client.get(f"/jobs/{job_id}", params={"wait": 0.3})
    assert resp.json()["state"] == "pending"
    assert resp.json()["poll_after_ms"] == 1000 and resp.headers["retry-after"] == "1"


def test_poll_after_grows_and_is_capped(client: TestClient) -> None:
    job_id = submit(client)
    got = [client.get(f"/jobs/{job_id}", params={"polls": n}) for n in (0, 1, 4, 5, 99)]
    assert [g.json()["poll_after_ms"] for g in got] == [1000, 2000, 16000, 30000, 30000]
    assert [g.headers["retry-after"] for g in got] == ["1", "2", "16", "30", "30"]


def test_finished_job_answers_at_once_without_poll_after(client: TestClient, h: Harness) -> None:
    job_id = submit(client)
    h.worker("w1", slots=1)
    assert run(h, "w1") == [job_id]
    h.finish(job_id)
    resp = client.get(f"/jobs/{job_id}", params={"wait": 60})
    assert resp.json()["state"] == "completed"
    assert "poll_after_ms" not in resp.json() and "retry-after" not in resp.headers


@pytest.mark.parametrize("params", [{"wait": -1}, {"wait": 61}, {"polls": -1},
                                    {"wait": 1, "until": "soon"}])
def test_bad_long_poll_parameters_are_422(client: TestClient, params: dict[str, Any]) -> None:
    resp = client.get(f"/jobs/{submit(client)}", params=params)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


# -- submit and wait in one request ---------------------------------------------------------


def count_job_reads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job reads (HGET, HGETALL) the API's own Redis client makes from here on."""
    api_redis = client.app.state.tidal.redis  # type: ignore[attr-defined]
    reads: list[str] = []
    for name in ("hget", "hgetall"):
        real = getattr(api_redis, name)

        def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            reads.append(f"{_name} {args[0]}")
            return _real(*args)
        monkeypatch.setattr(api_redis, name, counted)
    return reads


def post_and_wait(client: TestClient, spec: dict[str, Any]
                  ) -> tuple[threading.Thread, dict[str, Any], Any, str]:
    """POST /jobs?wait=30 in a thread; (the thread, its answer, the watch, the job id)
    once the request waits on its job."""
    answer: dict[str, Any] = {}

    def post() -> None:
        resp = client.post("/jobs", params={"wait": 30}, json=spec)
        answer.update(status=resp.status_code, body=resp.json())

    poster = threading.Thread(target=post)
    poster.start()
    watch = wait_for(lambda: getattr(client.app.state, "job_watch", None),  # type: ignore[attr-defined]
                     what="the request to start watching")
    job_id = wait_for(lambda: next(iter(watch.waiters), None),
                      what="the request to wait on its job")
    return poster, answer, watch, job_id


def test_submit_with_wait_answers_once_the_job_finished(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /jobs?wait=: the request holds through every transition and answers with the
    terminal document (what the SDK's run uses: one request per job). It never reads the
    job: it waits from before the job is written, and the job's entry in the finished
    stream brings the terminal document along (finish.lua)."""
    reads = count_job_reads(client, monkeypatch)
    poster, answer, watch, job_id = post_and_wait(client, {"command": ["true"]})
    run_and_fail_while_held(h, watch, job_id, poster)
    assert answer["status"] == 202
    assert answer["body"]["id"] == job_id
    assert (answer["body"]["state"], answer["body"]["exit_code"]) == ("failed", 3)
    assert "poll_after_ms" not in answer["body"]
    assert reads == []
    entry = r.xrevrange(keys.finished(), count=1)[0][1]
    assert entry["job"] == job_id and "doc" in entry
    monkeypatch.undo()
    assert client.get(f"/jobs/{job_id}").json() == answer["body"]


def test_submit_with_wait_reads_a_large_job_itself(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A document over finish.lua's DOC_MAX does not ride in the finished stream (it keeps
    10,000 entries): the request reads the job once it ended."""
    reads = count_job_reads(client, monkeypatch)
    big = {"command": ["true"], "env": {"BIG": "x" * 20_000}}
    poster, answer, watch, job_id = post_and_wait(client, big)
    run_and_fail_while_held(h, watch, job_id, poster)
    assert (answer["body"]["state"], answer["body"]["env"]) == ("failed", big["env"])
    assert "doc" not in r.xrevrange(keys.finished(), count=1)[0][1]
    assert reads == [f"hgetall {keys.job(job_id)}"]


def test_submit_with_wait_of_an_idempotent_resubmission_waits_for_the_first_job(
    client: TestClient, h: Harness
) -> None:
    """An idempotency key that names an earlier, finished job: the request answers that
    job's document at once (it looks first: its end is past)."""
    spec = {"command": ["true"], "idempotency_key": "once"}
    first = submit(client, idempotency_key="once")
    h.worker("w1", slots=1)
    assert run(h, "w1") == [first]
    h.finish(first)
    resp = client.post("/jobs", params={"wait": 30}, json=spec)
    assert resp.status_code == 202
    assert (resp.json()["id"], resp.json()["state"]) == (first, "completed")


def test_submit_with_wait_gives_the_job_as_it_stands_when_the_wait_ends(
    client: TestClient
) -> None:
    resp = client.post("/jobs", params={"wait": 0.3}, json={"command": ["true"]})
    assert resp.status_code == 202
    body = resp.json()
    assert body["state"] == "pending" and body["poll_after_ms"] == 1000
    assert resp.headers["retry-after"] == "1"
    assert client.get(f"/jobs/{body['id']}").json()["state"] == "pending"  # accepted


def test_submit_with_wait_refuses_a_batch_before_writing_anything(
    client: TestClient, r: redis.Redis, keys: Keys
) -> None:
    resp = client.post("/jobs", params={"wait": 5}, json=[{"command": ["true"]}] * 2)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_submission" and error["message"].startswith("wait:")
    assert error["details"][0]["loc"] == ["query", "wait"]
    assert r.xlen(keys.submissions()) == 0


@pytest.mark.parametrize("wait", [-1, 61, "soon"])
def test_submit_with_a_bad_wait_is_422(client: TestClient, r: redis.Redis, keys: Keys,
                                       wait: Any) -> None:
    resp = client.post("/jobs", params={"wait": wait}, json={"command": ["true"]})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
    assert r.xlen(keys.submissions()) == 0


# -- events ---------------------------------------------------------------------------------


def test_events_list_every_transition_before_and_after_mirroring(
    client: TestClient, h: Harness, recorder: Recorder
) -> None:
    job_id = submit(client)
    h.worker("w1", slots=1)
    run(h, "w1")
    h.finish(job_id, "failed", exit_code=3)
    expected = ["pending", "queued", "dispatched", "running", "failed"]
    live = client.get(f"/jobs/{job_id}/events").json()  # nothing mirrored yet: from the stream
    assert [e["state"] for e in live["events"]] == expected and live["complete"] is True
    assert recorder.catch_up() == 5
    mirrored = client.get(f"/jobs/{job_id}/events").json()
    assert mirrored == live
    events = mirrored["events"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert events[0]["by"] == "admin" and events[3]["by"] == "w1"
    assert events[4]["data"]["exit_code"] == "3" and events[4]["time"].endswith("Z")


def test_events_say_incomplete_when_neither_mirror_nor_stream_has_them(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys, recorder: Recorder
) -> None:
    job_id = submit(client)
    recorder.catch_up()
    h.step()  # queued: not mirrored, and then trimmed out of the stream
    r.xtrim(keys.events(), maxlen=0)
    body = client.get(f"/jobs/{job_id}/events").json()
    assert [e["state"] for e in body["events"]] == ["pending"] and body["complete"] is False


def test_events_of_another_users_job_are_404(client: TestClient) -> None:
    job_id = submit(client)
    token = client.post("/tokens", json={"user": "mallory"}).json()["token"]
    resp = client.get(f"/jobs/{job_id}/events", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


# -- queues and metrics ---------------------------------------------------------------------


@pytest.fixture
def cluster(client: TestClient, h: Harness, recorder: Recorder) -> dict[str, Any]:
    """default: 2 slots, 4 jobs (one completed, one failed, two waiting); gpu: 1 slot, 2 jobs
    (one running, one waiting); two jobs for host hv1 (one holds it, one waits)."""
    h.worker("w1", slots=2, queues="default")
    h.worker("w2", slots=1, queues="gpu")
    done = submit(client, priority="high")
    bad = submit(client, priority="high")
    low = [submit(client, priority="low"), submit(client, priority="low")]
    gpu = [submit(client, queue="gpu"), submit(client, queue="gpu")]
    assert sorted(run(h, "w1")) == sorted([done, bad])
    assert run(h, "w2", "gpu") == [gpu[0]]
    h.finish(done)
    h.finish(bad, "failed", exit_code=2)
    h.worker("w1", slots=0, queues="default")  # no slot now: the low jobs stay queued
    host = [submit(client, queue="hq", host="hv1"), submit(client, queue="hq", host="hv1")]
    h.step()
    recorder.catch_up()
    return {"done": done, "bad": bad, "low": low, "gpu": gpu, "host": host}


def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    resp = client.get("/metrics", headers={"Authorization": ""})  # no token needed
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_match_the_jobs_that_ran(
    client: TestClient, cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_route, "MIRROR_CACHE_S", 0.0)
    m = scrape(client)

    def one(name: str, **labels: str) -> float:
        return m[name][tuple(sorted(labels.items()))]

    assert one("tidal_jobs_submitted_total", queue="default") == 4
    assert one("tidal_jobs_submitted_total", queue="gpu") == 2
    assert one("tidal_jobs_completed_total", queue="default") == 1
    assert one("tidal_jobs_failed_total", queue="default") == 1
    assert one("tidal_jobs_failed_total", queue="gpu") == 0
    assert one("tidal_jobs", queue="default", state="queued", priority="low") == 2
    assert one("tidal_jobs", queue="default", state="completed", priority="high") == 1
    assert one("tidal_jobs", queue="gpu", state="running", priority="normal") == 1
    assert one("tidal_queue_depth", queue="default") == 2
    assert one("tidal_queue_depth", queue="gpu") == 1
    assert one("tidal_jobs_in_flight", queue="gpu") == 1
    assert one("tidal_jobs_running", queue="gpu") == 1
    assert one("tidal_jobs_running", queue="default") == 0
    assert one("tidal_workers") == 2 and one("tidal_worker_slots") == 1
    assert one("tidal_worker_slots_busy") == 0  # the harness heartbeats no running jobs yet
    assert one("tidal_host_locks_held") == 1 and one("tidal_host_waiters") == 1
    assert one("tidal_recorder_lag_entries") == 0 and one("tidal_recorder_lag_seconds") == 0
    assert one("tidal_recorder_pending_entries") == 0
    # the two finished default jobs are in the histograms; nothing else finished
    assert one("tidal_job_wait_seconds_count", queue="default") == 2
    assert one("tidal_job_run_seconds_bucket", queue="default", le="+Inf") == 2
    assert one("tidal_job_run_seconds_bucket", queue="default", le="14400.0") == 2
    assert list(m["tidal_job_wait_seconds_count"]) == [(("queue", "default"),)]


def test_metrics_show_the_recorder_lagging(
    client: TestClient, cluster: dict[str, Any], r: redis.Redis, keys: Keys
) -> None:
    submit(client)
    submit(client)
    m = scrape(client)
    assert m["tidal_recorder_lag_entries"][()] == 2
    assert m["tidal_recorder_lag_seconds"][()] >= 0


def test_queues_show_depth_running_and_rates(client: TestClient, cluster: dict[str, Any]) -> None:
    resp = client.get("/queues")
    assert resp.status_code == 200
    by_name = {q["queue"]: q for q in resp.json()}
    assert by_name["default"] == {
        "queue": "default", "queued": 2, "in_flight": 0, "running": 0, "delayed": 0,
        "workers": 1, "slots": 0, "completed_1m": 1, "failed_1m": 1, "completed_1h": 1,
        "failed_1h": 1,
    }
    assert by_name["gpu"] | {"completed_1m": 0} == {
        "queue": "gpu", "queued": 1, "in_flight": 1, "running": 1, "delayed": 0,
        "workers": 1, "slots": 1, "completed_1m": 0, "failed_1m": 0, "completed_1h": 0,
        "failed_1h": 0,
    }
    assert "hq" in by_name


def test_queues_count_delayed_jobs(client: TestClient, h: Harness, recorder: Recorder) -> None:
    submit(client, scheduled_at="2100-01-01T00:00:00Z")
    h.step()
    recorder.catch_up()
    [default] = client.get("/queues").json()
    assert (default["delayed"], default["queued"]) == (1, 0)


def test_queues_need_a_token(client: TestClient) -> None:
    resp = client.get("/queues", headers={"Authorization": ""})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"


# -- the log mirror -------------------------------------------------------------------------


def test_a_finished_jobs_log_is_served_from_the_mirror_once_redis_dropped_it(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys, recorder: Recorder
) -> None:
    job_id = submit(client)
    h.worker("w1", slots=1)
    run(h, "w1")
    ids = write_log(r, keys, job_id, 2500)  # more than one page of the copy
    r.xadd(keys.log(job_id), {"s": "o", "t": T0, "l": "part one", "c": "1"})
    h.finish(job_id)
    recorder.catch_up()
    recorder.catch_up()
    recorder.copy_logs([job_id])  # a replay adds nothing
    with Session(recorder.engine) as db:
        count = db.exec(select(func.count()).select_from(LogRecord)).one()
    assert count == 2501
    from_redis = client.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()
    r.delete(keys.log(job_id))

    lines, cursor = [], None
    while True:
        page = client.get(f"/jobs/{job_id}/logs",
                          params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
        lines += page["lines"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert lines == from_redis["lines"]
    assert [ln["id"] for ln in lines[:-1]] == ids
    assert lines[1] | {"time": None} == {"id": ids[1], "stream": "stderr", "time": None,
                                         "text": "line 1"}
    assert lines[1]["time"].startswith("2026-01-01T00:00:00.001")

    frames = follow(client, job_id, headers={"Last-Event-ID": ids[2497]})
    assert [f.get("id") for f in frames[:-1]] == [*ids[2498:], lines[-1]["id"]]
    assert frames[-1]["event"] == "end" and orjson.loads(frames[-1]["data"])["id"] == job_id
