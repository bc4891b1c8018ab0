"""GET /jobs/{id}/logs: pages over the log stream, and SSE follow with resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from api.routes import logs as log_routes
from common.keys import Keys

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def job_id(client: TestClient) -> str:
    resp = client.post("/jobs", json={"command": ["make"]})
    assert resp.status_code == 202
    return str(resp.json()["id"])


def write_lines(r: redis.Redis, keys: Keys, job_id: str, lines: list[tuple[str, str]]) -> list[str]:
    """XADD fake log entries the way a worker does (s = o|e|x, t = ms, l = text)."""
    return [
        str(r.xadd(keys.log(job_id), {"s": s, "t": T0 + i, "l": text}))
        for i, (s, text) in enumerate(lines)
    ]


def finish(r: redis.Redis, keys: Keys, job_id: str, state: str = "completed") -> None:
    r.hset(keys.job(job_id), mapping={"state": state, "exit_code": 0, "finished_at": T0})


# -- pages ----------------------------------------------------------------------------------


def test_pages(client: TestClient, r: redis.Redis, keys: Keys, job_id: str) -> None:
    ids = write_lines(r, keys, job_id, [("o", "one"), ("e", "two"), ("x", "three"),
                                        ("o", "four"), ("o", "five")])
    url = f"/jobs/{job_id}/logs"
    first = client.get(url, params={"limit": 2}).json()
    assert first["job_id"] == job_id
    assert [(ln["stream"], ln["text"]) for ln in first["lines"]] == [("stdout", "one"),
                                                                     ("stderr", "two")]
    assert first["lines"][0]["id"] == ids[0]
    assert first["lines"][0]["time"].startswith("2026-01-01T00:00:00")
    assert first["next_cursor"] == ids[1]
    second = client.get(url, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [ln["text"] for ln in second["lines"]] == ["three", "four"]
    assert second["lines"][0]["stream"] == "system"
    last = client.get(url, params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [ln["text"] for ln in last["lines"]] == ["five"] and last["next_cursor"] is None
    assert len(client.get(url).json()["lines"]) == 5


def test_no_stream_yet_is_an_empty_page(client: TestClient, job_id: str) -> None:
    assert client.get(f"/jobs/{job_id}/logs").json() == {
        "job_id": job_id, "lines": [], "next_cursor": None,
    }


@pytest.mark.parametrize("params", [{"cursor": "abc"}, {"cursor": "1-2-3"}, {"limit": 0},
                                    {"limit": 10_001}, {"follow": "true", "after": "x"}])
def test_bad_parameters_are_422(client: TestClient, job_id: str, params: dict[str, Any]) -> None:
    resp = client.get(f"/jobs/{job_id}/logs", params=params)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


def test_bad_last_event_id_is_422(client: TestClient, job_id: str) -> None:
    resp = client.get(f"/jobs/{job_id}/logs", params={"follow": "true"},
                      headers={"Last-Event-ID": "nope"})
    assert resp.status_code == 422


# -- SSE ------------------------------------------------------------------------------------


def parse_frames(chunks: Iterator[str]) -> Iterator[dict[str, str]]:
    """SSE frames as dicts (id, event, data, or comment) from a text stream."""
    frame: dict[str, str] = {}
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while "\n\n" in buffer:
            raw, buffer = buffer.split("\n\n", 1)
            for line in raw.split("\n"):
                if line.startswith(":"):
                    frame["comment"] = line[1:].strip()
                else:
                    name, _, value = line.partition(": ")
                    frame[name] = value
            yield frame
            frame = {}


def follow(client: TestClient, job_id: str, **kw: Any) -> list[dict[str, str]]:
    url = f"/jobs/{job_id}/logs"
    with client.stream("GET", url, params={"follow": "true", **kw.pop("params", {})}, **kw) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(parse_frames(resp.iter_text()))


def test_follow_finished_job_yields_lines_then_end(client: TestClient, r: redis.Redis,
                                                   keys: Keys, job_id: str) -> None:
    ids = write_lines(r, keys, job_id, [("o", "hello"), ("e", "warn: x"), ("o", 'quote " \n')])
    finish(r, keys, job_id)
    frames = follow(client, job_id)
    assert [f["event"] for f in frames] == ["line", "line", "line", "end"]
    assert [f["id"] for f in frames[:3]] == ids
    assert orjson.loads(frames[0]["data"]) == {
        "stream": "stdout", "time": "2026-01-01T00:00:00.000Z", "text": "hello"}
    assert orjson.loads(frames[2]["data"])["text"] == 'quote " \n'
    assert "id" not in frames[3]
    end = orjson.loads(frames[3]["data"])
    assert end["id"] == job_id and end["state"] == "completed" and end["exit_code"] == 0


def test_follow_resumes_after_last_event_id(client: TestClient, r: redis.Redis, keys: Keys,
                                            job_id: str) -> None:
    ids = write_lines(r, keys, job_id, [("o", "1"), ("o", "2"), ("o", "3")])
    finish(r, keys, job_id, "failed")
    frames = follow(client, job_id, headers={"Last-Event-ID": ids[1]})
    assert [(f["event"], f.get("id")) for f in frames] == [("line", ids[2]), ("end", None)]
    assert orjson.loads(frames[-1]["data"])["state"] == "failed"
    frames = follow(client, job_id, params={"after": ids[0]})
    assert [f.get("id") for f in frames] == [ids[1], ids[2], None]


def test_follow_live_lines_until_the_job_ends(client: TestClient, r: redis.Redis, keys: Keys,
                                              job_id: str) -> None:
    r.hset(keys.job(job_id), "state", "running")
    [first] = write_lines(r, keys, job_id, [("o", "early")])
    url = f"/jobs/{job_id}/logs"
    with client.stream("GET", url, params={"follow": "true"}) as resp:
        frames = parse_frames(resp.iter_text())
        assert next(frames)["id"] == first
        later = str(r.xadd(keys.log(job_id), {"s": "o", "t": T0, "l": "late"}))
        got = next(frames)
        assert (got["id"], orjson.loads(got["data"])["text"]) == (later, "late")
        last = str(r.xadd(keys.log(job_id), {"s": "e", "t": T0, "l": "last words"}))
        finish(r, keys, job_id)  # the worker flushed its lines before finishing
        rest = list(frames)
    assert [f.get("id") for f in rest] == [last, None]
    assert rest[-1]["event"] == "end"


def test_follow_pings_when_quiet_and_stops_on_close(client: TestClient, job_id: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_routes, "PING_S", 0.0)
    with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true"}) as resp:
        frames = parse_frames(resp.iter_text())
        assert next(frames) == {"comment": "ping"}
        assert next(frames) == {"comment": "ping"}
    # leaving the block disconnects; the job is still pending, so only the close ends it
    assert client.get("/healthz").status_code == 200


def test_follow_reports_redis_failure_as_an_error_event(
    client: TestClient, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any, **__: Any) -> Any:
        raise redis.exceptions.ConnectionError("Connection refused")

    reader = log_routes.raw_reader(client.app.state.tidal.redis)  # type: ignore[attr-defined]
    monkeypatch.setattr(reader, "xread", broken)
    [frame] = follow(client, job_id)
    assert frame["event"] == "error"
    assert orjson.loads(frame["data"]) == {
        "code": "redis_unavailable", "message": "Redis is unavailable: Connection refused"}


def test_follow_other_users_job_is_404(client: TestClient, job_id: str) -> None:
    token = client.post("/tokens", json={"user": "mallory"}).json()["token"]
    resp = client.get(f"/jobs/{job_id}/logs", params={"follow": "true"},
                      headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_batch_follow_sends_a_read_as_one_lines_frame(client: TestClient, r: redis.Redis,
                                                      keys: Keys, job_id: str) -> None:
    """batch=true: a read's run of lines is one `lines` frame whose id is its last line's;
    each line keeps its own id; a progress entry keeps its own frame in its place."""
    ids = write_lines(r, keys, job_id, [("o", "one"), ("e", 'two "2"')])
    ids.append(str(r.xadd(keys.log(job_id), {"s": "p", "t": T0, "l": "progress 40%",
                                              "pc": "40", "st": "build", "m": ""})))
    ids += write_lines(r, keys, job_id, [("x", "three")])
    finish(r, keys, job_id)
    frames = follow(client, job_id, params={"batch": "true"})
    assert [(f["event"], f.get("id")) for f in frames] == [
        ("lines", ids[1]), ("progress", ids[2]), ("lines", ids[3]), ("end", None)]
    assert orjson.loads(frames[0]["data"]) == {"lines": [
        {"id": ids[0], "stream": "stdout", "time": "2026-01-01T00:00:00.000Z", "text": "one"},
        {"id": ids[1], "stream": "stderr", "time": "2026-01-01T00:00:00.001Z",
         "text": 'two "2"'}]}
    assert orjson.loads(frames[1]["data"])["percent"] == 40.0
    assert [x["text"] for x in orjson.loads(frames[2]["data"])["lines"]] == ["three"]
    # resuming after a frame's id, or after any line's own id, loses and repeats nothing
    again = follow(client, job_id, params={"batch": "true"}, headers={"Last-Event-ID": ids[0]})
    assert [x["id"] for f in again if f["event"] == "lines"
            for x in orjson.loads(f["data"])["lines"]] == [ids[1], ids[3]]
