"""Progress and usage against a real server: progress.lua's fencing, then a real worker
(threads, real processes) running python and shell jobs that report progress while a
real SSE follower (the API in-process) and a WebSocket client watch; the job document,
its events and the rate limit; peak RSS and CPU of a shell job that works for them."""

from __future__ import annotations

import sys
import threading
from typing import Any

import orjson
import redis
from fastapi.testclient import TestClient

from common import scripts as sc
from common.jobs import job_from_hash
from common.keys import GROUP_WORKERS, Keys
from common.settings import Settings
from common.streams import ensure_group
from tests.integration.test_api_logs import follow
from tests.integration.test_worker_service import MAXLEN, enqueue, serving, wait_done
from tests.support import wait_for
from worker.python import JobContext

# -- progress.lua ---------------------------------------------------------------------------


def report(scripts: sc.Scripts, keys: Keys, job_id: str, token: str, percent: str = "40",
           stage: str = "build", event: bool = True) -> Any:
    return scripts.run(sc.progress(
        keys, job_id, token, percent=percent, stage=stage, message="3 of 8",
        text=f"progress {percent}% {stage}: 3 of 8", log_maxlen=1000, event=event,
        events_maxlen=MAXLEN))


def start(r: redis.Redis, keys: Keys, worker: str = "w1") -> tuple[str, str]:
    """A job dispatched and started by `worker`: (job id, its token)."""
    job_id = enqueue(r, keys, command=["true"])
    token = str(r.hget(keys.job(job_id), "dispatch_id"))
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    r.xreadgroup(GROUP_WORKERS, worker, {keys.dispatch("default"): ">"})
    [row] = sc.Scripts(r).run(sc.start(keys, "default", [(token, job_id)], worker=worker,
                                       events_maxlen=MAXLEN))
    assert int(row[1]) == 1
    return job_id, str(token)


def test_progress_lua_writes_the_hash_the_log_and_an_event(r: redis.Redis, keys: Keys) -> None:
    scripts = sc.Scripts(r)
    job_id, token = start(r, keys)
    seq = int(r.hget(keys.job(job_id), "seq") or 0)
    assert report(scripts, keys, job_id, token) == 1
    h = r.hgetall(keys.job(job_id))
    assert (h["progress"], h["progress_stage"], h["progress_message"]) == ("40", "build", "3 of 8")
    assert h["progress_attempt"] == "1" and int(h["progress_at"]) > 0
    assert h["state"] == "running" and int(h["seq"]) == seq + 1
    [(_eid, entry)] = r.xrange(keys.log(job_id))
    assert entry == {"s": "p", "t": h["progress_at"], "l": "progress 40% build: 3 of 8",
                     "pc": "40", "st": "build", "m": "3 of 8"}
    _eid, event = r.xrevrange(keys.events(), count=1)[0]
    assert event == {"job": job_id, "seq": str(seq + 1), "state": "running",
                     "at": h["progress_at"], "by": "w1", "attempt": "1", "progress": "40",
                     "stage": "build"}
    doc = job_from_hash(h)
    assert doc.progress is not None
    assert (doc.progress.percent, doc.progress.stage, doc.progress.message) == (40.0, "build",
                                                                               "3 of 8")
    # without the event flag: the hash and the log only, the seq does not move
    assert report(scripts, keys, job_id, token, "50", event=False) == 1
    assert int(r.hget(keys.job(job_id), "seq") or 0) == seq + 1
    assert r.xlen(keys.log(job_id)) == 2


def test_progress_lua_is_fenced(r: redis.Redis, keys: Keys) -> None:
    scripts = sc.Scripts(r)
    queued = enqueue(r, keys, command=["true"])  # dispatched, not started yet
    entry = r.hget(keys.job(queued), "dispatch_id")
    assert report(scripts, keys, queued, str(entry)) == -2  # not running
    job_id, token = start(r, keys)
    before = r.hgetall(keys.job(job_id))
    assert report(scripts, keys, job_id, "1-1") == -1  # a stale attempt's token
    assert report(scripts, keys, "nosuchjob", token) == -3
    assert r.hgetall(keys.job(job_id)) == before
    assert r.xlen(keys.log(job_id)) == 0
    outcome = sc.Outcome("completed", 0)
    assert scripts.run(sc.finish(keys, job_id, "default", token, outcome, worker="w1",
                                 retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=60)) == "completed"
    assert report(scripts, keys, job_id, token) == -1  # the attempt is over
    assert "progress" not in r.hgetall(keys.job(job_id))


# -- a real worker, a real follower ---------------------------------------------------------


def staged(ctx: JobContext) -> str:
    """Reports at a human pace (each report is past the rate limit's interval)."""
    ctx.progress(0, "download")
    ctx.log("fetching")
    ctx.wait(0.15)
    ctx.progress(50, "download", "half")
    ctx.wait(0.15)
    ctx.progress(100, "build", "done")
    return "ok"


def tight_loop(ctx: JobContext, n: int = 100_000) -> int:
    for i in range(n + 1):
        ctx.progress(100 * i / n, "loop")
    return n


def progress_frames(frames: list[dict[str, str]]) -> list[tuple[float, str | None, str | None]]:
    return [(d["percent"], d["stage"], d["message"]) for f in frames if f.get("event") == "progress"
            for d in [orjson.loads(f["data"])]]


def follow_in_thread(client: TestClient, job_id: str) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.extend(follow(client, job_id)))
    thread.start()
    return thread, got


def test_a_follower_sees_a_python_jobs_progress_and_the_document_keeps_the_last(
    settings: Settings, keys: Keys, r: redis.Redis, client: TestClient
) -> None:
    with serving(settings.model_copy(update={"allow_modules": [__name__]})):
        job_id = enqueue(r, keys, kind="python", function=f"{__name__}:staged")
        follower, frames = follow_in_thread(client, job_id)
        follower.join(timeout=30)
        assert not follower.is_alive()
    assert [f["event"] for f in frames][-1] == "end"
    assert progress_frames(frames) == [(0.0, "download", None), (50.0, "download", "half"),
                                       (100.0, "build", "done")]
    kinds = [f["event"] for f in frames]
    assert kinds.index("progress") < kinds.index("line")  # in order with the output
    ids = [f["id"] for f in frames if "id" in f]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    end = orjson.loads(frames[-1]["data"])
    assert end["state"] == "completed"
    assert end["progress"]["percent"] == 100 and end["progress"]["stage"] == "build"
    doc = client.get(f"/jobs/{job_id}").json()
    assert doc["progress"]["message"] == "done" and doc["progress"]["time"]
    # a page of the log holds the output only
    page = client.get(f"/jobs/{job_id}/logs").json()
    assert [ln["text"] for ln in page["lines"]] == ["fetching"]
    # events: the transitions, and the progress at a new stage or a new 10 % step
    events = wait_for(lambda: [e for e in client.get(f"/jobs/{job_id}/events").json()["events"]
                               if e["state"] == "progress"], what="progress events")
    assert [(e["data"]["progress"], e["data"].get("stage")) for e in events] == [
        ("0", "download"), ("50", "download"), ("100", "build")]


def test_a_follower_sees_a_shell_jobs_progress_lines_as_progress(
    settings: Settings, keys: Keys, r: redis.Redis, client: TestClient
) -> None:
    script = ("echo '::tidal progress 10 fetch'; echo out; sleep 0.15; "
              "echo '::tidal progress 60 build half way there'; sleep 0.15; "
              "echo '::tidal progress 101 too-far'; echo '::tidal progress 100'")
    with serving(settings):
        job_id = enqueue(r, keys, command=script)
        follower, frames = follow_in_thread(client, job_id)
        follower.join(timeout=30)
        assert not follower.is_alive()
    assert [(f["event"], orjson.loads(f["data"]).get("text")) for f in frames[:-1]] == [
        ("progress", None), ("line", "out"), ("progress", None),
        ("line", "::tidal progress 101 too-far"), ("progress", None)]
    assert progress_frames(frames) == [(10.0, "fetch", None),
                                       (60.0, "build", "half way there"), (100.0, None, None)]
    end = orjson.loads(frames[-1]["data"])
    assert end["progress"] == {"percent": 100.0, "stage": None, "message": None,
                               "time": end["progress"]["time"]}
    # resume after the second progress frame: exactly what follows it
    second = [f["id"] for f in frames if f.get("event") == "progress"][1]
    rest = follow(client, job_id, headers={"Last-Event-ID": second})
    assert [f["event"] for f in rest] == ["line", "progress", "end"]


def test_a_websocket_client_gets_progress_messages(
    settings: Settings, keys: Keys, r: redis.Redis, client: TestClient
) -> None:
    with serving(settings):
        job_id = enqueue(r, keys, command="echo '::tidal progress 30 warm'; echo hi")
        wait_done(r, keys, job_id)
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"cmd": "reconnect_job", "id": job_id, "after": None})
        messages = []
        while not messages or messages[-1]["type"] != "end":
            messages.append(ws.receive_json())
    progress = [m for m in messages if m["type"] == "progress"]
    assert [(m["percent"], m["stage"], m["job_id"]) for m in progress] == [(30.0, "warm", job_id)]
    assert [m["type"] for m in messages if m["type"] in ("progress", "line")] == ["progress",
                                                                                   "line"]


def test_a_tight_loop_of_reports_is_rate_limited(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings.model_copy(update={"allow_modules": [__name__]})):
        job_id = enqueue(r, keys, kind="python", function=f"{__name__}:tight_loop")
        h = wait_done(r, keys, job_id, timeout=30)
    assert h["state"] == "completed"
    written = [f for _, f in r.xrange(keys.log(job_id)) if f["s"] == "p"]
    assert 2 <= len(written) <= 60, len(written)  # 100,001 calls; ~10 writes a second
    assert (written[0]["pc"], written[-1]["pc"]) == ("0", "100")  # the last one always
    assert h["progress"] == "100"
    events = [f for _, f in r.xrange(keys.events()) if f.get("job") == job_id and "progress" in f]
    assert 1 <= len(events) <= 11


# -- usage ----------------------------------------------------------------------------------


def test_a_shell_jobs_document_has_its_usage_and_times(
    settings: Settings, keys: Keys, r: redis.Redis, client: TestClient
) -> None:
    burn = ("import time; b = b'x' * (80 << 20); t = time.process_time()\n"
            "while time.process_time() - t < 0.8: pass")
    with serving(settings):
        job_id = enqueue(r, keys, command=[sys.executable, "-c", burn])
        assert wait_done(r, keys, job_id, timeout=30)["state"] == "completed"
    doc = client.get(f"/jobs/{job_id}").json()
    assert 80 * 1024 <= doc["peak_rss_kb"] < 4 * 1024 * 1024
    assert 0.7 <= doc["cpu_s"] < 60
    assert doc["run_ms"] >= 700 and doc["wait_ms"] >= 0
    assert doc["wait_ms"] + doc["run_ms"] < 60_000
