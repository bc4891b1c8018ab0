"""callback_url: the job document POSTed on the terminal state to a real HTTP server on
127.0.0.1, retried with back-off, the outcome shown in GET /jobs/{id}/events, never
holding the job back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from common.db import make_engine
from common.keys import Keys
from common.settings import Settings
from common.tables import CallbackRecord
from common.valkey import free_port
from scheduler.callbacks import CallbackPolicy, CallbackSender
from scheduler.recorder import Recorder
from tests.integration.harness import Harness
from tests.support import wait_for

FAST = CallbackPolicy(concurrency=2, timeout_s=5.0, max_attempts=3, delay_s=0.001,
                      max_delay_s=0.01)


@dataclass
class Receiver:
    """A local HTTP server that records every POST and answers the given statuses in turn
    (then 200)."""

    statuses: list[int] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def answer(self) -> int:
        return self.statuses.pop(0) if self.statuses else 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got.posts.append({"path": self.path, "body": json.loads(body),
                              "headers": dict(self.headers)})
            self.send_response(got.answer())
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    got.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    harness = Harness(r, keys, settings)
    harness.worker("w1", slots=4)
    return harness


@pytest.fixture
def recorder(r: redis.Redis, settings: Settings) -> Iterator[Recorder]:
    rec = Recorder(settings, r, make_engine(settings))
    yield rec
    rec.engine.dispose()


@pytest.fixture
def sender(r: redis.Redis, keys: Keys, recorder: Recorder) -> Iterator[CallbackSender]:
    s = CallbackSender(r, keys, recorder.engine, FAST)
    yield s
    s.close()


def finished_job(client: TestClient, h: Harness, recorder: Recorder, url: str | None,
                 state: str = "completed") -> str:
    body: dict[str, Any] = {"command": ["true"], **({"callback_url": url} if url else {})}
    job_id = str(client.post("/jobs", json=body).json()["id"])
    h.step()
    assert h.take("w1") == [job_id]
    h.finish(job_id, state, exit_code=0 if state == "completed" else 1)
    recorder.catch_up()
    return job_id


def deliver_all(sender: CallbackSender, status: str, rec_engine: Any, job_id: str) -> Any:
    """Tick until the job's callback row reaches `status`; returns the row."""
    def row() -> CallbackRecord | None:
        with Session(rec_engine) as db:
            found = db.exec(select(CallbackRecord).where(CallbackRecord.job_id == job_id)).one()
        if found.status == status and sender.idle():
            return found
        sender.tick()
        return None

    return wait_for(row, what=f"the callback to be {status}")


def callback_events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    events = client.get(f"/jobs/{job_id}/events").json()["events"]
    return [e for e in events if e["state"].startswith("callback_")]


def test_the_job_document_is_posted_once_on_the_terminal_state(
    client: TestClient, h: Harness, recorder: Recorder, sender: CallbackSender,
    receiver: Receiver, r: redis.Redis, keys: Keys,
) -> None:
    job_id = finished_job(client, h, recorder, receiver.url)
    assert client.get(f"/jobs/{job_id}").json()["callback_url"] == receiver.url
    deliver_all(sender, "delivered", recorder.engine, job_id)
    [post] = receiver.posts
    assert post["path"] == "/hook"
    assert post["body"]["id"] == job_id and post["body"]["state"] == "completed"
    assert post["headers"]["X-Tidal-Job"] == job_id and post["headers"]["X-Tidal-Seq"] == "5"
    [event] = callback_events(client, job_id)
    assert event["state"] == "callback_delivered" and event["seq"] == 5
    assert event["data"] == {"url": receiver.url, "attempts": 1, "status_code": 200}
    # replaying the events writes no second row and posts nothing more
    recorder.apply([(eid, f) for eid, f in r.xrange(keys.events())])
    assert sender.tick() == 0
    assert len(receiver.posts) == 1


def test_a_failing_receiver_is_retried_then_given_up_and_the_job_is_not_held(
    client: TestClient, h: Harness, recorder: Recorder, sender: CallbackSender,
    receiver: Receiver,
) -> None:
    receiver.statuses = [500] * 10
    job_id = finished_job(client, h, recorder, receiver.url, state="failed")
    assert client.get(f"/jobs/{job_id}").json()["state"] == "failed"  # before any callback
    row = deliver_all(sender, "failed", recorder.engine, job_id)
    assert (row.attempts, row.status_code, row.error) == (3, 500, "HTTP 500")
    assert len(receiver.posts) == 3
    [event] = callback_events(client, job_id)
    assert event["state"] == "callback_failed" and event["by"] == "recorder"
    assert event["data"]["error"] == "HTTP 500" and event["data"]["attempts"] == 3


def test_a_receiver_that_recovers_gets_it_on_a_later_attempt(
    client: TestClient, h: Harness, recorder: Recorder, sender: CallbackSender,
    receiver: Receiver,
) -> None:
    receiver.statuses = [503]
    job_id = finished_job(client, h, recorder, receiver.url)
    row = deliver_all(sender, "delivered", recorder.engine, job_id)
    assert row.attempts == 2 and len(receiver.posts) == 2


def test_an_unreachable_receiver_is_recorded(
    client: TestClient, h: Harness, recorder: Recorder, r: redis.Redis, keys: Keys,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody"
    job_id = finished_job(client, h, recorder, url)
    one_try = CallbackSender(r, keys, recorder.engine,
                             CallbackPolicy(max_attempts=1, timeout_s=2.0))
    try:
        row = deliver_all(one_try, "failed", recorder.engine, job_id)
    finally:
        one_try.close()
    assert row.status_code is None and "ConnectError" in row.error


def test_two_senders_never_post_the_same_callback(
    client: TestClient, h: Harness, recorder: Recorder, sender: CallbackSender,
    receiver: Receiver, r: redis.Redis, keys: Keys,
) -> None:
    job_id = finished_job(client, h, recorder, receiver.url)
    other = CallbackSender(r, keys, recorder.engine, FAST)
    try:
        assert sender.tick() == 1
        assert other.tick() == 0  # claimed: leased to the first
        deliver_all(sender, "delivered", recorder.engine, job_id)
        assert other.tick() == 0
    finally:
        other.close()
    assert len(receiver.posts) == 1


def test_jobs_without_a_callback_get_no_row(
    client: TestClient, h: Harness, recorder: Recorder, sender: CallbackSender,
) -> None:
    job_id = finished_job(client, h, recorder, None)
    with Session(recorder.engine) as db:
        assert db.exec(select(CallbackRecord)).all() == []
    assert sender.tick() == 0 and callback_events(client, job_id) == []


@pytest.mark.parametrize("url", ["ftp://example.org/x", "http:///nohost", "/relative",
                                 "http://a b/", "http://host:99999/"])
def test_only_http_urls_are_accepted(client: TestClient, url: str) -> None:
    resp = client.post("/jobs", json={"command": ["true"], "callback_url": url})
    assert resp.status_code == 422
    assert resp.json()["error"]["message"].startswith("callback_url:")
