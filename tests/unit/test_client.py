"""common/client.py against an httpx.MockTransport: error mapping, SSE, reconnects, paging."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from common.client import Client, SSEEvent, error_from_response, iter_sse
from common.errors import (
    Conflict,
    Forbidden,
    InvalidSubmission,
    JobNotFound,
    LimitExceeded,
    RedisUnavailable,
    TidalError,
    Unauthorized,
)
from common.models import Job, LogLine, State

Handler = Callable[[httpx.Request], httpx.Response]


def job_doc(job_id: str = "J1", state: str = "pending", **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "state": state, "owner": "admin", "kind": "shell", "queue": "default",
            "priority": "normal", "command": ["true"], **extra}


def envelope(status: int, code: str, message: str, details: Any = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message,
                                                  "details": details}})


def make_client(handler: Handler, token: str | None = "tok") -> Client:
    client = Client("http://tidal.test/", token, transport=httpx.MockTransport(handler))
    client._sleep = lambda seconds: None
    return client


class Chunks(httpx.SyncByteStream):
    """A response body delivered in the given pieces, optionally failing after them."""

    def __init__(self, chunks: list[str], error: Exception | None = None) -> None:
        self.chunks, self.error = chunks, error

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            yield chunk.encode()
        if self.error is not None:
            raise self.error


def sse(chunks: list[str], error: Exception | None = None) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=Chunks(chunks, error))


def line_frame(entry_id: str, text: str, stream: str = "stdout") -> str:
    data = json.dumps({"stream": stream, "time": "2026-01-01T00:00:00Z", "text": text})
    return f"id: {entry_id}\nevent: line\ndata: {data}\n\n"


def end_frame(**job: Any) -> str:
    return f"event: end\ndata: {json.dumps(job_doc(**job))}\n\n"


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(401, Unauthorized), (403, Forbidden), (404, JobNotFound), (409, Conflict),
     (413, InvalidSubmission), (415, InvalidSubmission), (422, InvalidSubmission),
     (429, LimitExceeded), (503, RedisUnavailable), (500, TidalError), (418, TidalError)],
)
def test_error_envelope_maps_to_exception(status: int, exc_type: type[TidalError]) -> None:
    details = [{"loc": "command", "msg": "required"}]
    client = make_client(lambda r: envelope(status, "x", f"went wrong {status}", details))
    with client, pytest.raises(TidalError) as info:
        client.get("J1")
    assert type(info.value) is exc_type
    assert info.value.message == f"went wrong {status}"
    assert info.value.details == details


def test_error_without_envelope_keeps_status_and_text() -> None:
    request = httpx.Request("GET", "http://tidal.test/jobs")
    error = error_from_response(httpx.Response(502, text="<html>bad gateway</html>",
                                               request=request))
    assert type(error) is TidalError
    assert "HTTP 502" in error.message and "bad gateway" in error.message


def test_connection_refused_says_how_to_fix_it() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    with make_client(refuse) as client, pytest.raises(TidalError) as info:
        client.health()
    assert info.value.message == (
        "cannot reach the Tidal API at http://tidal.test: is `tidal up` running?"
    )


def test_unauthorized_without_token_hints_at_the_token() -> None:
    client = make_client(lambda r: envelope(401, "unauthorized", "missing token"), token=None)
    with client, pytest.raises(Unauthorized, match="missing token.*TIDAL_TOKEN"):
        client.workers()


# -- requests -------------------------------------------------------------------------------


def test_submit_sends_the_set_fields_with_the_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=job_doc("J9", priority="high"))

    with make_client(handler) as client:
        job = client.submit({"command": ["echo", "hi"], "priority": "high"})
    assert isinstance(job, Job) and job.id == "J9" and job.state == State.PENDING
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/jobs")
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.content) == {"command": ["echo", "hi"], "priority": "high"}


def test_submit_validates_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("an invalid submission must not be sent")

    with make_client(handler) as client, pytest.raises(InvalidSubmission) as info:
        client.submit({"command": ["true"], "priority": "urgent"})
    assert [d["loc"] for d in info.value.details] == ["priority"]


def test_submit_with_nan_is_refused_not_sent_as_nan() -> None:
    with make_client(lambda r: httpx.Response(500)) as client:
        with pytest.raises(InvalidSubmission, match="not valid JSON"):
            client.submit({"kind": "python", "function": "m:f", "args": [float("nan")]})
        with pytest.raises(InvalidSubmission, match="not valid JSON"):
            client.submit({"kind": "python", "function": "m:f", "kwargs": {"x": [float("inf")]}})


def test_submit_many_sends_each_job_as_submit_would_and_reads_the_batch() -> None:
    subs: list[Any] = [{"command": ["a"], "priority": "high"},
                       {"kind": "python", "function": "m:f", "args": [1, "ü"], "timeout": 5},
                       {"command": "echo hi", "resources": {"cpu": 1}}]
    subs.append(Client._model({"command": ["b"], "tags": {"t": "1"}}))  # a model as is
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"jobs": [job_doc(f"J{i}") for i in range(len(subs))]})

    with make_client(handler) as client:
        jobs = client.submit_many(subs)
    assert [j.id for j in jobs] == ["J0", "J1", "J2", "J3"]
    assert all(isinstance(j, Job) and j.state == State.PENDING for j in jobs)
    (request,) = seen
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == [Client._body(s) for s in subs]
    assert json.loads(request.content)[1] == {"kind": "python", "function": "m:f",
                                              "args": [1, "ü"], "timeout": 5.0}


def test_submit_many_refuses_the_first_bad_job_as_submit_does() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("an invalid batch must not be sent")

    with make_client(handler) as client:
        with pytest.raises(InvalidSubmission) as info:
            client.submit_many([{"command": ["true"]}, {"command": ["x"], "priority": "urgent"},
                                {"command": ["y"], "retries": -1}])
        assert [d["loc"] for d in info.value.details] == ["priority"]
        with pytest.raises(InvalidSubmission, match="not valid JSON"):
            client.submit_many([{"command": ["true"]},
                                {"kind": "python", "function": "m:f", "args": [float("nan")]}])


@pytest.mark.parametrize(("key", "calls"), [(None, 1), ("deploy-1", 3)])
def test_submit_retries_only_with_an_idempotency_key(key: str | None, calls: int) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) < 3:
            return envelope(503, "redis_unavailable", "redis is down")
        return httpx.Response(202, json=job_doc())

    sub = {"command": ["true"], **({"idempotency_key": key} if key else {})}
    with make_client(handler) as client:
        if key is None:
            with pytest.raises(RedisUnavailable):
                client.submit(sub)
        else:
            assert client.submit(sub).id == "J1"
    assert len(seen) == calls and len(set(seen)) == 1


def test_submit_many_posts_a_list() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert isinstance(body, list) and len(body) == 2
        return httpx.Response(202, json={"jobs": [job_doc("A"), job_doc("B")]})

    with make_client(handler) as client:
        jobs = client.submit_many([{"command": "true"}, {"command": ["false"]}])
    assert [j.id for j in jobs] == ["A", "B"]


def test_iter_jobs_follows_cursors() -> None:
    pages = {
        None: {"jobs": [job_doc("A"), job_doc("B")], "next_cursor": "c1"},
        "c1": {"jobs": [], "next_cursor": "c2"},  # filtered empty, but more follow
        "c2": {"jobs": [job_doc("C")], "next_cursor": None},
    }
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        return httpx.Response(200, json=pages[params.get("cursor")])

    with make_client(handler) as client:
        ids = [j.id for j in client.iter_jobs(state="running", queue="gpu", page_size=2)]
    assert ids == ["A", "B", "C"]
    assert [p.get("cursor") for p in seen] == [None, "c1", "c2"]
    assert all(p["state"] == "running" and p["queue"] == "gpu" and p["limit"] == "2"
               for p in seen)
    assert all("host" not in p for p in seen)


def test_cancel_is_a_delete() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("DELETE", "/jobs/J1")
        return httpx.Response(202, json=job_doc(state="cancelled"))

    with make_client(handler) as client:
        assert client.cancel("J1").state == State.CANCELLED


def test_job_ids_stay_one_path_segment() -> None:
    paths: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path)
        return envelope(404, "not_found", "no such job")

    with make_client(handler) as client, pytest.raises(JobNotFound):
        client.get("../tokens?admin=1")
    assert paths == [b"/jobs/..%2Ftokens%3Fadmin%3D1"]


def test_wait_polls_until_terminal_with_backoff() -> None:
    states = iter(["queued", "running", "running", "completed"])
    client = make_client(lambda r: httpx.Response(200, json=job_doc(state=next(states))))
    slept: list[float] = []
    client._sleep = slept.append
    with client:
        assert client.wait("J1").state == State.COMPLETED
    # long-polls back to back while the job moves; an early answer with nothing new waits
    # the advised poll_after_ms (1 s when the answer has none). tests/unit/test_live_client.py
    assert slept == [1.0]


def test_wait_times_out() -> None:
    with make_client(lambda r: httpx.Response(200, json=job_doc(state="running"))) as client:
        with pytest.raises(TimeoutError, match="still running"):
            client.wait("J1", timeout=0)


def test_run_is_one_request_when_the_job_finishes_within_the_wait() -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, dict(request.url.params)))
        return httpx.Response(202, json=job_doc(state="completed", exit_code=0))

    with make_client(handler) as client:
        assert client.run({"command": ["true"]}).state == State.COMPLETED
    assert seen == [("POST", "/jobs", {"wait": "30.000"})]


def test_run_goes_on_with_long_polls_when_the_submit_wait_ends_first() -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, dict(request.url.params)))
        if request.method == "POST":
            return httpx.Response(202, json=job_doc(state="running"))
        return httpx.Response(200, json=job_doc(state="failed", exit_code=2))

    with make_client(handler) as client:
        client.long_poll_s = 5.0
        assert client.run({"command": ["false"]}, timeout=60).exit_code == 2
    assert [(m, p) for m, p, _ in seen] == [("POST", "/jobs"), ("GET", "/jobs/J1")]
    assert seen[0][2] == {"wait": "5.000"} and seen[1][2]["until"] == "finished"


def test_run_times_out_with_the_job_still_going() -> None:
    with make_client(lambda r: httpx.Response(202, json=job_doc(state="queued"))) as client:
        with pytest.raises(TimeoutError, match="still queued"):
            client.run({"command": ["true"]}, timeout=0)


def test_iter_logs_pages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        n = 0 if cursor is None else int(cursor)
        lines = [{"id": f"{n}-0", "stream": "stdout", "time": "2026-01-01T00:00:00Z",
                  "text": f"line {n}"}]
        return httpx.Response(200, json={"job_id": "J1", "lines": lines,
                                         "next_cursor": str(n + 1) if n < 2 else None})

    with make_client(handler) as client:
        assert [x.text for x in client.iter_logs("J1")] == ["line 0", "line 1", "line 2"]


# -- SSE ------------------------------------------------------------------------------------


def test_iter_sse_parses_fields_comments_and_multiline_data() -> None:
    lines = [": ping", "", "id: 1-0", "event: line", "data: a", "data: b", "", "retry: 10",
             "data:no-space", "", "event: end", "data: {}"]  # the last frame is cut off
    assert list(iter_sse(lines)) == [
        SSEEvent("line", "a\nb", "1-0"),
        SSEEvent("message", "no-space", None),
    ]


def test_follow_reassembles_split_frames_and_skips_pings() -> None:
    body = ": ping\n\n" + line_frame("1-0", "hello") + ": ping\n\n" + \
        line_frame("2-0", "oops", "stderr") + end_frame(state="failed", exit_code=3)
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]  # splits lines and frames

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["follow"] == "true"
        assert "last-event-id" not in request.headers
        return sse(chunks)

    with make_client(handler) as client:
        items = list(client.follow("J1"))
    assert [(i.id, i.stream, i.text) for i in items[:2] if isinstance(i, LogLine)] == [
        ("1-0", "stdout", "hello"), ("2-0", "stderr", "oops"),
    ]
    final = items[2]
    assert isinstance(final, Job) and final.exit_code == 3 and len(items) == 3


def test_follow_reconnects_with_last_event_id_and_no_duplicates() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:  # drops mid-frame, after two whole lines
            cut = line_frame("1-0", "one") + line_frame("2-0", "two") + line_frame("3-0", "th")
            return sse([cut[:-15]], httpx.ReadError("connection reset"))
        if len(requests) == 2:  # ends without `end`: an incomplete stream
            return sse([line_frame("3-0", "three")])
        # a server that replays one line too many must not make us print it twice
        return sse([line_frame("3-0", "three"), line_frame("4-0", "four"),
                    end_frame(state="completed", exit_code=0)])

    with make_client(handler) as client:
        items = list(client.follow("J1"))
    texts = [i.text for i in items if isinstance(i, LogLine)]
    assert texts == ["one", "two", "three", "four"]
    assert isinstance(items[-1], Job) and items[-1].state == State.COMPLETED
    assert [r.headers.get("last-event-id") for r in requests] == [None, "2-0", "3-0"]


def test_follow_reconnects_after_an_error_event() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return sse([line_frame("1-0", "one"),
                        'event: error\ndata: {"code": "redis_unavailable", "message": "x"}\n\n'])
        assert request.headers["last-event-id"] == "1-0"
        return sse([line_frame("2-0", "two"), end_frame(state="completed")])

    with make_client(handler) as client:
        items = list(client.follow("J1"))
    assert [i.text for i in items if isinstance(i, LogLine)] == ["one", "two"]
    assert calls == 2


def test_follow_end_without_a_document_asks_for_the_job() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("follow"):
            return sse(["event: end\ndata: null\n\n"])
        assert request.url.path == "/jobs/J1"
        return httpx.Response(200, json=job_doc(state="expired"))

    with make_client(handler) as client:
        (final,) = list(client.follow("J1"))
    assert isinstance(final, Job) and final.state == State.EXPIRED


def test_follow_resumes_after_a_given_id() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        return sse([line_frame("5-0", "five"), end_frame(state="completed")])

    with make_client(handler) as client:
        assert len(list(client.follow("J1", after="4-0"))) == 2
    assert seen == ["4-0"]


def test_follow_gives_up_after_bounded_attempts() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("Connection refused", request=request)

    client = make_client(handler)
    client.follow_attempts = 3
    with client, pytest.raises(TidalError, match="lost the log stream of job J1: cannot reach"):
        list(client.follow("J1"))
    assert calls == 4


def test_follow_does_not_retry_a_missing_job() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return envelope(404, "not_found", "no job J1")

    with make_client(handler) as client, pytest.raises(JobNotFound, match="no job J1"):
        list(client.follow("J1"))
    assert calls == 1


def test_from_config_uses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TIDAL_DATA_DIR", raising=False)
    monkeypatch.setenv("TIDAL_URL", "http://env.test:1234")
    monkeypatch.setenv("TIDAL_TOKEN", "envtok")
    with Client.from_config() as client:
        assert (client.url, client.token) == ("http://env.test:1234", "envtok")


def test_a_url_without_http_is_an_error_at_the_first_call_not_a_crash() -> None:
    with Client("localhost:8000", "tok") as client, pytest.raises(TidalError,
                                                                  match="localhost:8000"):
        client.get("J1")
