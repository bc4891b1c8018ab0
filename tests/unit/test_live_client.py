"""The SDK and CLI side of watching jobs live: wait() by long-poll honouring poll_after_ms,
watch(), follow() with progress, events, queues, metrics; `tidal wait`, `tidal queues`,
`tidal events`, and progress in `tidal wait`, `submit --follow` and `status`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import cli.main
from cli.main import app
from common.client import Client
from common.models import (
    Job,
    JobEvent,
    JobEvents,
    LogLine,
    Progress,
    ProgressUpdate,
    QueueInfo,
    State,
)
from tests.unit.test_cli import FakeClient, make_job
from tests.unit.test_client import end_frame, job_doc, line_frame, make_client, sse

runner = CliRunner()


def recorded(answers: list[dict[str, Any]]) -> tuple[Client, list[httpx.Request], list[float]]:
    requests: list[httpx.Request] = []
    replies = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=next(replies))

    client = make_client(handler)
    slept: list[float] = []
    client._sleep = slept.append
    return client, requests, slept


# -- SDK ------------------------------------------------------------------------------------


def test_wait_long_polls_and_counts_its_polls() -> None:
    client, requests, slept = recorded([
        job_doc(state="queued", poll_after_ms=1000), job_doc(state="running", poll_after_ms=2000),
        job_doc(state="completed", exit_code=0),
    ])
    with client:
        assert client.wait("J1").state == State.COMPLETED
    assert [r.url.params.get("wait") for r in requests] == ["30.000"] * 3
    assert {r.url.params.get("until") for r in requests} == {"finished"}
    assert [r.url.params.get("polls") for r in requests] == [None, "1", "2"]
    assert slept == []  # every answer had news: asked again at once
    assert requests[0].extensions["timeout"]["read"] >= 60  # longer than the hold


def test_wait_honours_poll_after_when_the_server_answers_early_with_nothing_new() -> None:
    client, requests, slept = recorded([
        job_doc(state="running", poll_after_ms=1000), job_doc(state="running", poll_after_ms=2000),
        job_doc(state="running", poll_after_ms=4000), job_doc(state="completed"),
    ])
    with client:
        assert client.wait("J1").state == State.COMPLETED
    assert slept == [2.0, 4.0]


def test_wait_never_holds_past_its_timeout() -> None:
    client, requests, _ = recorded([job_doc(state="running", poll_after_ms=1000)] * 10_000)
    with client, pytest.raises(TimeoutError, match="still running after 0.05s"):
        client.wait("J1", timeout=0.05)
    assert all(float(r.url.params.get("wait", 0)) <= 0.05 for r in requests)


def test_get_without_wait_sends_no_long_poll_parameters() -> None:
    client, requests, _ = recorded([job_doc(state="running", poll_after_ms=1000)])
    with client:
        assert client.get("J1").poll_after_ms == 1000
    assert dict(requests[0].url.params) == {}


def test_events_queues_and_metrics() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jobs/J1/events":
            return httpx.Response(200, json={"job_id": "J1", "complete": False, "events": [
                {"seq": 1, "time": "2026-01-01T00:00:00Z", "state": "pending", "by": "alice",
                 "data": {}}]})
        if request.url.path == "/queues":
            return httpx.Response(200, json=[{"queue": "default", "queued": 3}])
        assert request.url.path == "/metrics"
        return httpx.Response(200, text="tidal_workers 2.0\n")

    with make_client(handler) as client:
        events = client.events("J1")
        assert (events.complete, events.events[0].by) == (False, "alice")
        [q] = client.queues()
        assert (q.queue, q.queued, q.running) == ("default", 3, 0)
        assert client.metrics() == "tidal_workers 2.0\n"


# -- CLI ------------------------------------------------------------------------------------


AT = datetime(2026, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)


class LiveFake(FakeClient):
    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[Job]:
        self._call("watch", (job_id, timeout))
        for percent, stage in ((10, "fetch"), (10, "fetch"), (60, "build")):
            yield make_job(job_id, "running").model_copy(
                update={"progress": Progress(percent=percent, stage=stage, time=AT)})
        yield self.final

    def follow(self, job_id: str, after: str | None = None,
               progress: bool = False) -> Iterator[LogLine | ProgressUpdate | Job]:
        self._call("follow", (job_id, progress))
        yield LogLine(id="1-0", stream="stdout", time=AT, text="out")
        if progress:
            yield ProgressUpdate(id="2-0", time=AT, percent=50, stage="build", message="half")
        yield self.final

    def queues(self) -> list[QueueInfo]:
        self._call("queues", None)
        return [QueueInfo(queue="default", queued=7, in_flight=2, running=2, slots=4, workers=1,
                          completed_1m=5, failed_1h=1),
                QueueInfo(queue="gpu")]

    def events(self, job_id: str) -> JobEvents:
        self._call("events", job_id)
        at = datetime(2026, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)
        return JobEvents(job_id=job_id, complete=False, events=[
            JobEvent(seq=1, time=at, state="pending", by="alice"),
            JobEvent(seq=2, time=at, state="failed", by="w[1]",
                     data={"exit_code": "3", "reason": "exit_code", "attempt": ""}),
        ])


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> LiveFake:
    fake = LiveFake()
    monkeypatch.setattr(cli.main, "get_client", lambda url=None, token=None: fake)
    return fake


def test_queues_table_and_json(live: LiveFake) -> None:
    result = runner.invoke(app, ["queues"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    header, default, gpu = result.stdout.splitlines()
    assert header.split() == ["QUEUE", "QUEUED", "INFLIGHT", "RUNNING", "DELAYED", "SLOTS",
                              "OK/1M", "FAIL/1M", "OK/1H", "FAIL/1H"]
    assert default.split() == ["default", "7", "2", "2", "0", "4", "5", "0", "0", "1"]
    assert gpu.split()[0] == "gpu"
    doc = json.loads(runner.invoke(app, ["queues", "--json"]).stdout)
    assert doc[0]["queued"] == 7 and doc[1]["queue"] == "gpu"


def test_events_table_warns_when_incomplete(live: LiveFake) -> None:
    result = runner.invoke(app, ["events", "J1"])
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[1].split() == ["1", "2026-01-01T12:00:00.250Z", "pending", "alice"]
    assert rows[2].split() == ["2", "2026-01-01T12:00:00.250Z", "failed", "w[1]",
                               "exit_code=3", "reason=exit_code"]
    assert "history is behind" in result.stderr
    doc = json.loads(runner.invoke(app, ["events", "J1", "--json"]).stdout)
    assert doc["complete"] is False and doc["events"][1]["data"]["exit_code"] == "3"


@pytest.mark.parametrize(("job", "code"), [
    ({"state": "completed", "exit_code": 0}, 0),
    ({"state": "failed", "exit_code": 7}, 7),
    ({"state": "failed", "reason": "timeout", "exit_code": -9}, 124),
    ({"state": "cancelled"}, 130),
])
def test_wait_exits_with_the_jobs_code(live: LiveFake, job: dict[str, Any], code: int) -> None:
    live.final = make_job(**job)
    result = runner.invoke(app, ["wait", "J1"])
    assert result.exit_code == code, result.output


def test_wait_prints_each_new_progress_as_a_plain_line_off_a_terminal(live: LiveFake) -> None:
    live.final = make_job(state="completed", exit_code=0)
    result = runner.invoke(app, ["wait", "J1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[:2] == ["[tidal] progress 10% fetch",
                                              "[tidal] progress 60% build"]
    assert "progress" not in result.stdout  # the final panel has no progress row: none


def test_wait_json_has_no_progress_lines(live: LiveFake) -> None:
    live.final = make_job(state="completed", exit_code=0)
    result = runner.invoke(app, ["wait", "J1", "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["state"] == "completed"


def test_follow_prints_progress_on_stderr_and_keeps_stdout_and_json_clean(
    live: LiveFake,
) -> None:
    live.final = make_job(state="completed", exit_code=0)
    result = runner.invoke(app, ["logs", "-f", "J1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "out\n"
    assert result.stderr == "[tidal] progress 50% build: half\n"
    assert ("follow", ("J1", True)) in live.calls
    as_json = runner.invoke(app, ["logs", "-f", "J1", "--json"])
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d.get("text") for d in docs] == ["out", None] and as_json.stderr == ""
    assert ("follow", ("J1", False)) in live.calls


def test_status_shows_progress_usage_and_times(live: LiveFake, monkeypatch: Any) -> None:
    job = make_job("J1", "completed").model_copy(update={
        "progress": Progress(percent=100, stage="done", message="all good", time=AT),
        "peak_rss_kb": 81920, "cpu_s": 1.234, "wait_ms": 850, "run_ms": 125_000})
    monkeypatch.setattr(live, "get", lambda job_id, *a, **k: job)
    result = runner.invoke(app, ["status", "J1"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "100% done: all good" in out
    assert "80.0 MiB" in out and "1.23s" in out and "850ms" in out and "2m05s" in out


def test_follow_with_progress_yields_reports_in_order_and_resumes_past_them() -> None:
    progress = ('id: 2-0\nevent: progress\ndata: {"time": "2026-01-01T00:00:00Z", '
                '"percent": 40.0, "stage": "build", "message": null}\n\n')
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:  # dropped right after the progress frame
            return sse([line_frame("1-0", "one"), progress])
        return sse([line_frame("3-0", "three"), end_frame(state="completed")])

    with make_client(handler) as client:
        items = list(client.follow("J1", progress=True))
    assert seen == [None, "2-0"]  # resumed after the progress frame, not the line before it
    assert [type(i).__name__ for i in items] == ["LogLine", "ProgressUpdate", "LogLine", "Job"]
    report = items[1]
    assert isinstance(report, ProgressUpdate)
    assert (report.id, report.percent, report.stage, report.message) == ("2-0", 40.0, "build",
                                                                         None)
    seen.clear()
    with make_client(handler) as client:
        plain = list(client.follow("J1"))  # without progress=True: lines and the job only
    assert [type(i).__name__ for i in plain] == ["LogLine", "LogLine", "Job"]


def test_watch_yields_each_changed_document_then_the_final_one() -> None:
    running = job_doc(state="running", poll_after_ms=1000)
    halfway = {**running, "progress": {"percent": 50, "stage": "b", "message": None,
                                       "time": None}}
    client, requests, _slept = recorded([running, halfway, halfway,
                                         job_doc(state="completed", exit_code=0)])
    with client:
        docs = list(client.watch("J1"))
    assert [(d.state, d.progress.percent if d.progress else None) for d in docs] == [
        (State.RUNNING, None), (State.RUNNING, 50), (State.COMPLETED, None)]
    assert len(requests) == 4


def test_follow_asks_for_batches_and_resumes_after_the_last_line_yielded() -> None:
    """The SDK asks for `lines` frames; each line inside one is a LogLine with its own id;
    a connection dropped after a frame resumes after that frame's last line."""
    def lines_frame(*items: tuple[str, str]) -> str:
        data = {"lines": [{"id": i, "stream": "stdout", "time": "2026-01-01T00:00:00.000Z",
                           "text": t} for i, t in items]}
        return f"id: {items[-1][0]}\nevent: lines\ndata: {json.dumps(data)}\n\n"

    seen: list[tuple[str | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers.get("last-event-id"), request.url.params.get("batch")))
        if len(seen) == 1:  # dropped after one whole frame and half of the next
            return sse([lines_frame(("1-0", "one"), ("1-1", "two")),
                        'id: 2-0\nevent: lines\ndata: {"lines": [{"id": "2-0"'])
        return sse([lines_frame(("2-0", "three")), line_frame("3-0", "four"),
                    end_frame(state="completed")])

    with make_client(handler) as client:
        items = list(client.follow("J1"))
    assert seen == [(None, "true"), ("1-1", "true")]
    got = [(i.id, i.text) for i in items if isinstance(i, LogLine)]
    assert got == [("1-0", "one"), ("1-1", "two"), ("2-0", "three"), ("3-0", "four")]
    assert isinstance(items[-1], Job)
