"""WebSocket /ws on a real server, jobs driven by the harness through the real Lua scripts:
auth at the handshake, run_job, reconnect_job after a drop, cancel_job, ownership, errors."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from common.keys import Keys
from common.settings import Settings
from tests.integration.harness import Harness

T0 = 1_767_225_600_000


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    harness = Harness(r, keys, settings)
    harness.worker("w1", slots=4)
    return harness


def user_token(client: TestClient, user: str) -> str:
    return str(client.post("/tokens", json={"user": user}).json()["token"])


def until(ws: Any, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first of type `kind`."""
    got = []
    while True:
        message = ws.receive_json()
        got.append(message)
        if message["type"] == kind:
            return got


def lines(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "line"]


def write(r: redis.Redis, keys: Keys, job_id: str, texts: list[str]) -> list[str]:
    return [str(r.xadd(keys.log(job_id), {"s": "o", "t": T0, "l": t})) for t in texts]


def test_handshake_without_a_valid_token_is_refused_with_the_envelope(
    client: TestClient,
) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect("/ws", headers=headers):
                pass
        assert denied.value.status_code == 401
        assert denied.value.json()["error"]["code"] == "unauthorized"


def test_run_job_streams_state_lines_and_end(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys
) -> None:
    with client.websocket_connect("/ws") as ws:  # the admin token in the Authorization header
        ws.send_json({"cmd": "run_job", "job": {"command": ["make"], "priority": "high"}})
        accepted = ws.receive_json()
        assert accepted["type"] == "accepted" and accepted["job"]["priority"] == "high"
        job_id = accepted["job"]["id"]
        first = ws.receive_json()
        assert first == {"type": "state", "job_id": job_id, "state": "pending", "seq": "1",
                         "attempt": "0"}
        h.step()
        assert h.take("w1") == [job_id]
        states = [m["state"] for m in until(ws, "state") if m["type"] == "state"]
        write(r, keys, job_id, ["hello", "world"])
        got = until(ws, "line")
        got += [ws.receive_json()]
        assert lines(got) == ["hello", "world"]
        assert got[-1]["job_id"] == job_id and got[-1]["stream"] == "stdout"
        h.finish(job_id, "failed", exit_code=3)
        rest = until(ws, "end")
    assert states and set(states) <= {"queued", "dispatched", "running"}
    assert rest[-1]["job"]["state"] == "failed" and rest[-1]["job"]["exit_code"] == 3
    assert [m["state"] for m in rest if m["type"] == "state"][-1] == "failed"


def test_reconnect_job_gets_exactly_the_missed_lines_and_the_job_keeps_running(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys
) -> None:
    token = user_token(client, "alice")
    url = f"/ws?token={token}"
    with client.websocket_connect(url) as ws:
        ws.send_json({"cmd": "run_job", "job": {"command": ["sh", "-c", "work"]}})
        job_id = ws.receive_json()["job"]["id"]
        h.step()
        h.take("w1")
        ids = write(r, keys, job_id, [f"line {i}" for i in range(10)])
        seen: list[str] = []
        while len(seen) < 4:
            message = ws.receive_json()
            if message["type"] == "line":
                seen.append(message["id"])
    # the client dropped after line 3; the job goes on and writes more
    assert h.state(job_id) == "running"
    more = write(r, keys, job_id, ["line 10", "line 11"])
    with client.websocket_connect(url) as ws:
        ws.send_json({"cmd": "reconnect_job", "id": job_id, "after": seen[-1]})
        assert ws.receive_json() == {"type": "following", "job_id": job_id, "after": ids[3]}
        assert ws.receive_json()["state"] == "running"
        got: list[str] = []
        while len(got) < 8:
            message = ws.receive_json()
            assert message["type"] == "line"
            got.append(message["id"])
        assert got == ids[4:] + more
        h.finish(job_id)
        end = until(ws, "end")[-1]
        assert end["job"]["state"] == "completed"
        # a finished job can be attached to as well: everything again, then the end
        ws.send_json({"cmd": "reconnect_job", "id": job_id, "after": None})
        replay = until(ws, "end")
    assert lines(replay) == [f"line {i}" for i in range(12)]


def test_a_user_attaches_only_to_their_own_jobs(client: TestClient) -> None:
    mine = client.post("/jobs", json={"command": ["true"]}).json()["id"]  # the admin's job
    with client.websocket_connect(f"/ws?token={user_token(client, 'mallory')}") as ws:
        for cmd in ("reconnect_job", "cancel_job"):
            ws.send_json({"cmd": cmd, "id": mine})
            error = ws.receive_json()
            assert error["type"] == "error" and error["cmd"] == cmd
            assert error["error"]["code"] == "not_found"
    assert client.get(f"/jobs/{mine}").json()["state"] == "pending"


def test_cancel_job(client: TestClient, h: Harness) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"cmd": "run_job", "job": {"command": ["sleep", "100"]}})
        job_id = ws.receive_json()["job"]["id"]
        ws.send_json({"cmd": "cancel_job", "id": job_id})
        messages = until(ws, "end")
    cancel = [m for m in messages if m["type"] == "cancelling"]
    assert cancel and cancel[0]["job"]["state"] == "cancelled"
    assert messages[-1]["job"]["state"] == "cancelled"
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"cmd": "cancel_job", "id": job_id})
        assert ws.receive_json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(("frame", "code", "message"), [
    ("not json", "json_invalid", "Invalid JSON"),
    ('{"cmd": "fly"}', "validation_error", ""),
    ('{"cmd": "run_job", "job": {"command": ["x"], "priority": "urgent"}}', "validation_error",
     "job.priority"),
    ('{"cmd": "reconnect_job", "id": "x", "after": "nope"}', "validation_error", "after"),
    ('{"cmd": "reconnect_job", "id": "x"}', "not_found", "job x not found"),
])
def test_bad_commands_answer_the_envelope_and_keep_the_connection(
    client: TestClient, frame: str, code: str, message: str
) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_text(frame)
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == code
        assert message in error["error"]["message"]
        ws.send_text("[]")  # still answering
        assert ws.receive_json()["error"]["code"] == "validation_error"



def test_batch_follow_sends_a_read_as_one_lines_message(
    client: TestClient, h: Harness, r: redis.Redis, keys: Keys
) -> None:
    """With batch, a read's lines are one `lines` message (each line with its id); a
    progress entry keeps its own message in its place; reconnecting after any line's id
    gives exactly the lines after it."""
    job_id = str(client.post("/jobs", json={"command": ["make"]}).json()["id"])
    ids = write(r, keys, job_id, ["a", "b"])
    ids.append(str(r.xadd(keys.log(job_id), {"s": "p", "t": T0, "l": "progress 50%",
                                              "pc": "50", "st": "", "m": ""})))
    ids += write(r, keys, job_id, ["c"])
    h.step()
    h.take("w1")
    h.finish(job_id)  # over: the follow reads the whole log at once, then ends
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"cmd": "reconnect_job", "id": job_id, "after": None, "batch": True})
        got = [m for m in until(ws, "end") if m["type"] in ("lines", "line", "progress")]
        ws.send_json({"cmd": "reconnect_job", "id": job_id, "after": ids[0], "batch": True})
        again = [m for m in until(ws, "end") if m["type"] == "lines"]
    assert [m["type"] for m in got] == ["lines", "progress", "lines"]
    assert [(x["id"], x["text"], x["stream"]) for x in got[0]["lines"]] == [
        (ids[0], "a", "stdout"), (ids[1], "b", "stdout")]
    assert got[1]["id"] == ids[2] and got[1]["percent"] == 50.0
    assert [x["id"] for x in got[2]["lines"]] == [ids[3]]
    assert [x["text"] for m in again for x in m["lines"]] == ["b", "c"]
