"""Watching jobs live against real processes (`tidal up`: Redis, API on uvicorn, scheduler
with the recorder, a worker running real shell jobs): a follower that drops every 500
lines, a WebSocket client that reconnects to a running job, binary output, `tidal wait`
by long-poll, the log served from SQL after Redis dropped it, a callback to a local
server, /metrics parsed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from common.client import Client
from common.keys import DEFAULT_PREFIX, Keys
from common.models import Job, LogLine
from common.redis import connect
from common.valkey import free_port
from tests.e2e.conftest import Procs, clean_env, tidal_cmd
from tests.support import wait_for

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    tmp: Path
    url: str
    token: str
    redis: redis.Redis
    client: Client

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(tidal_cmd(*args), cwd=self.tmp, env=clean_env(self.tmp),
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("live")
    procs = Procs()
    try:
        procs.start(tidal_cmd("up", "--port", str(free_port()), "--data-dir", str(tmp / ".tidal"),
                              "--workers", "1", "--concurrency", "4"),
                    cwd=tmp, env=clean_env(tmp), log=tmp / "up.log")
        cfg = tmp / ".tidal" / "cli.json"
        wait_for(lambda: cfg.exists() and "url" in cfg.read_text(), timeout=60, what="cli.json")
        found = json.loads(cfg.read_text())
        r = connect(found["redis_url"])
        with Client(found["url"], found["token"]) as client:
            wait_for(lambda: client.workers(), timeout=30, what="a live worker")
            yield Cluster(tmp, found["url"], found["token"], r, client)
        r.close()
    finally:
        procs.stop_all()


def test_a_follower_dropping_every_500_lines_gets_all_5000_exactly_once(
    cluster: Cluster,
) -> None:
    script = ('i=1; while [ $i -le 5000 ]; do echo "line $i"; '
              'if [ $((i % 500)) -eq 0 ]; then sleep 0.1; fi; i=$((i+1)); done')
    job = cluster.client.submit({"command": ["sh", "-c", script]})
    texts: list[str] = []
    last: str | None = None
    final: Job | None = None
    drops = 0
    while final is None:
        with closing(cluster.client.follow(job.id, after=last)) as items:
            for item in items:
                if isinstance(item, Job):
                    final = item
                    break
                texts.append(item.text)
                last = item.id
                if len(texts) % 500 == 0:
                    drops += 1
                    break  # hang up; reconnect after the last line seen
    assert texts == [f"line {i}" for i in range(1, 5001)]
    assert drops == 10 and final.state == "completed"

    # once the recorder copied it, the log survives Redis dropping its copy
    db = cluster.tmp / ".tidal" / "tidal.db"

    def mirrored() -> int:
        with closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT count(*) FROM logs WHERE job_id = ?",
                                    (job.id,)).fetchone()[0])

    stored = list(cluster.client.iter_logs(job.id))
    wait_for(lambda: mirrored() == len(stored), timeout=20, what="the log in the SQL mirror")
    assert cluster.redis.delete(Keys(DEFAULT_PREFIX).log(job.id)) == 1
    assert list(cluster.client.iter_logs(job.id)) == stored
    out = cluster.cli("logs", job.id)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "line 5000"


def test_a_websocket_client_reconnects_to_a_running_job(cluster: Cluster) -> None:
    gate = cluster.tmp / "gate"
    script = f'echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second'
    url = cluster.url.replace("http://", "ws://") + f"/ws?token={cluster.token}"

    def until(ws: Any, kind: str) -> list[dict[str, Any]]:
        got = []
        while True:
            got.append(json.loads(ws.recv(timeout=30)))
            if got[-1]["type"] == kind:
                return got

    with ws_connect(url) as ws:
        ws.send(json.dumps({"cmd": "run_job", "job": {"command": ["sh", "-c", script]}}))
        job_id = until(ws, "accepted")[-1]["job"]["id"]
        first = until(ws, "line")[-1]
        assert first["text"] == "first"
    assert cluster.client.get(job_id).state == "running"  # it goes on without its client
    with ws_connect(url) as ws:
        ws.send(json.dumps({"cmd": "reconnect_job", "id": job_id, "after": first["id"]}))
        assert until(ws, "state")[-1]["state"] == "running"
        gate.touch()
        rest = until(ws, "end")
    assert [m["text"] for m in rest if m["type"] == "line"] == ["second"]
    assert rest[-1]["job"]["state"] == "completed"


def test_binary_output_reaches_a_follower_replaced_not_lost(cluster: Cluster) -> None:
    job = cluster.client.submit({"command": ["sh", "-c", r"printf 'ok \377\376 bytes\n'"]})
    items = list(cluster.client.follow(job.id))
    lines = [i.text for i in items if isinstance(i, LogLine)]
    assert lines == ["ok \ufffd\ufffd bytes"]
    assert isinstance(items[-1], Job) and items[-1].state == "completed"


def test_progress_reaches_the_cli_the_document_and_the_events(cluster: Cluster) -> None:
    """A shell job's `::tidal progress` lines: plain progress lines from `submit --follow`
    and `wait` (not a terminal here), the job's own output untouched on stdout, the last
    report in `status`, and peak RSS / CPU in the document."""
    script = ("echo '::tidal progress 25 prep'; echo out; sleep 0.3; "
              "echo '::tidal progress 100 done all good'")
    out = cluster.cli("submit", "--follow", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "out\n"
    assert "[tidal] progress 25% prep\n" in out.stderr
    assert "[tidal] progress 100% done: all good\n" in out.stderr
    as_json = cluster.cli("submit", "--follow", "--json", "--", "sh", "-c", script)
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d.get("text") for d in docs[:-1]] == ["out"]  # --json: lines and the job only
    job_id = docs[-1]["id"]
    assert docs[-1]["progress"]["percent"] == 100
    job = cluster.client.submit({"command": ["sh", "-c", "sleep 0.3; " + script]})
    waited = cluster.cli("wait", job.id)
    assert waited.returncode == 0, waited.stderr
    assert "[tidal] progress 100% done: all good" in waited.stderr
    status = cluster.cli("status", job_id)
    assert "100% done: all good" in status.stdout and "peak RSS" in status.stdout
    doc = cluster.client.get(job_id)
    assert doc.peak_rss_kb and doc.cpu_s is not None and doc.run_ms and doc.run_ms >= 300
    events = wait_for(lambda: [e for e in cluster.client.events(job_id).events
                               if e.state == "progress"], timeout=20, what="progress events")
    assert [e.data.get("stage") for e in events] == ["prep", "done"]


def test_tidal_wait_long_polls_and_exits_with_the_jobs_code(cluster: Cluster) -> None:
    job = cluster.client.submit({"command": ["sh", "-c", "sleep 0.5; exit 5"]})
    out = cluster.cli("wait", job.id)
    assert out.returncode == 5, out.stderr
    events = cluster.cli("events", job.id, "--json")
    assert events.returncode == 0, events.stderr
    states = [e["state"] for e in json.loads(events.stdout)["events"]]
    assert states[0] == "pending" and states[-1] == "failed" and "running" in states


def test_sdk_run_submits_and_waits_in_one_call(cluster: Cluster) -> None:
    quick = cluster.client.run({"command": ["sh", "-c", "exit 6"]}, timeout=30)
    assert (quick.state, quick.exit_code) == ("failed", 6)
    # a job that outlasts the submit's wait: run goes on with long-polls
    cluster.client.long_poll_s = 0.2
    try:
        slow = cluster.client.run({"command": ["sh", "-c", "sleep 0.6"]}, timeout=30)
    finally:
        cluster.client.long_poll_s = 30.0
    assert slow.state == "completed" and slow.run_ms is not None and slow.run_ms >= 500


def test_a_callback_reaches_a_local_server_when_the_job_ends(cluster: Cluster) -> None:
    posts: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/done"
        job = cluster.client.submit({"command": ["sh", "-c", "exit 4"], "callback_url": url})
        assert cluster.client.wait(job.id, timeout=30).exit_code == 4
        wait_for(lambda: posts, timeout=20, what="the callback POST")
    finally:
        server.shutdown()
        server.server_close()
    assert [(p["id"], p["state"], p["exit_code"]) for p in posts] == [(job.id, "failed", 4)]
    events = cluster.client.events(job.id).events
    wait_for(lambda: cluster.client.events(job.id).events[-1].state == "callback_delivered",
             timeout=10, what="the delivery in the job's events")
    assert events[0].state == "pending"


def test_metrics_parsed_match_what_ran(cluster: Cluster) -> None:
    jobs = [cluster.client.submit({"command": ["true"], "queue": "default"}) for _ in range(3)]
    jobs += [cluster.client.submit({"command": ["sh", "-c", "exit 1"]}) for _ in range(2)]
    for job in jobs:
        cluster.client.wait(job.id, timeout=30)
    ids = {job.id for job in jobs}

    def mirrored() -> list[Any] | None:  # the listing (the SQL mirror) lags Redis a little
        listed = list(cluster.client.iter_jobs())
        done = {j.id for j in listed if j.state in ("completed", "failed")}
        return listed if ids <= done else None

    every = wait_for(mirrored, timeout=30, what="the mirror to list the jobs that ran")
    expected = {state: sum(1 for j in every if j.state == state)
                for state in ("completed", "failed")}
    assert expected["completed"] >= 3 and expected["failed"] >= 2

    def sample(text: str, name: str) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels.get("queue") == "default":
                    return s.value
        return -1

    def matches() -> bool:
        text = cluster.client.metrics()
        return (sample(text, "tidal_jobs_completed_total") == expected["completed"]
                and sample(text, "tidal_jobs_failed_total") == expected["failed"]
                and sample(text, "tidal_jobs_submitted_total") == len(every)
                and sample(text, "tidal_job_run_seconds_count") == len(every))

    wait_for(matches, timeout=30, interval=0.5, what="/metrics to count the jobs that ran")
    queues = json.loads(cluster.cli("queues", "--json").stdout)
    [default] = [q for q in queues if q["queue"] == "default"]
    assert default["completed_1h"] == expected["completed"]
    assert default["slots"] == 4 and default["workers"] == 1
