"""The worker against a real server and real processes: jobs are driven into the dispatch
stream with the Lua scripts (submit → admit → dispatch), a `Worker` runs in a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psutil
import pytest
import redis

from common import scripts as sc
from common.clock import monotonic
from common.jobs import job_from_hash, new_job_id, submission_fields
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from tests.support import wait_for
from worker.python import JobContext
from worker.service import Worker

MAXLEN = 10_000
TERMINAL = {"completed", "failed", "cancelled", "retrying"}


def enqueue(r: redis.Redis, keys: Keys, *, dispatch: bool = True, **spec: Any) -> str:
    """submit → admit → dispatch one job, as the API and the scheduler would (dispatch
    False: left queued)."""
    s = sc.Scripts(r)
    job_id = new_job_id()
    sub = JobSubmission.model_validate(spec)
    s.run(sc.submit(keys, job_id, "alice", submission_fields(sub), events_maxlen=MAXLEN))
    ensure_group(r, keys.submissions(), GROUP_SCHEDULERS)
    entries = [
        sc.Admission(entry_id, f["id"], f["q"], f["h"] or None)
        for _stream, items in r.xreadgroup(GROUP_SCHEDULERS, "s1", {keys.submissions(): ">"})
        for entry_id, f in items
    ]
    s.run(sc.admit(keys, entries, events_maxlen=MAXLEN, priority_step_ms=300_000, by="s1"))
    if not dispatch:
        return job_id
    sent, _held = s.run(sc.dispatch(keys, sub.queue, [job_id], capacity=sc.Capacity(1000),
                                    events_maxlen=MAXLEN, by="s1"))
    assert sent == 1
    return job_id


@contextmanager
def serving(
    settings: Settings, prepare: Callable[[Worker], None] | None = None
) -> Iterator[Worker]:
    worker = Worker(settings, block_ms=100)
    if prepare is not None:
        prepare(worker)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced in the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-worker")
    thread.start()
    try:
        yield worker
    finally:
        worker.stop(force=True)
        thread.join(timeout=15)
    assert not thread.is_alive(), "the worker did not stop"
    assert not errors, errors


def state(r: redis.Redis, keys: Keys, job_id: str) -> str | None:
    return r.hget(keys.job(job_id), "state")


def wait_done(r: redis.Redis, keys: Keys, job_id: str, timeout: float = 10.0) -> dict[str, str]:
    wait_for(lambda: state(r, keys, job_id) in TERMINAL, timeout=timeout, what=f"{job_id} ends")
    return r.hgetall(keys.job(job_id))


def log_lines(r: redis.Redis, keys: Keys, job_id: str, stream: str | None = None) -> list[str]:
    return [f["l"] for _, f in r.xrange(keys.log(job_id)) if stream is None or f["s"] == stream]


def processes(marker: str) -> list[psutil.Process]:
    """Live descendants of the test process whose argv is exactly `marker`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def gone(procs: list[psutil.Process]) -> bool:
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            continue
    return True


# -- shell jobs -------------------------------------------------------------------------


def test_shell_job_completes_with_its_output(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings) as worker:
        job = enqueue(r, keys, command="echo one; echo two; echo oops >&2")
        h = wait_done(r, keys, job)
    assert (h["state"], h["exit_code"], h["worker"]) == ("completed", "0", worker.id)
    assert log_lines(r, keys, job, "o") == ["one", "two"]
    assert log_lines(r, keys, job, "e") == ["oops"]
    entry = r.xrange(keys.log(job))[0][1]
    assert set(entry) == {"s", "t", "l"} and int(entry["t"]) > 0
    assert r.xlen(keys.dispatch("default")) == 0
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0
    events = [(f["state"], f["by"]) for _, f in r.xrange(keys.events()) if f["job"] == job]
    assert events[-2:] == [("running", worker.id), ("completed", worker.id)]
    assert r.ttl(keys.job(job)) > 0 and r.ttl(keys.log(job)) > 0


def test_exit_code_and_exec_error_then_more_work(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings):
        three = enqueue(r, keys, command="exit 3")
        missing = enqueue(r, keys, command=["/nonexistent/tidal-command", "x"])
        h3, hm = wait_done(r, keys, three), wait_done(r, keys, missing)
        after = enqueue(r, keys, command=["echo", "still serving"])
        ha = wait_done(r, keys, after)
    assert (h3["state"], h3["exit_code"], h3["reason"]) == ("failed", "3", "exit_code")
    doc = job_from_hash(hm)
    assert (doc.state, doc.exit_code, doc.reason) == ("failed", None, "exec_error")
    assert "No such file" in (doc.error or "")
    assert log_lines(r, keys, missing, "x") == [doc.error]
    assert ha["state"] == "completed"
    assert log_lines(r, keys, after) == ["still serving"]


def test_timeout_kills_grandchildren(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    marker = "sleep 93"
    with serving(settings.model_copy(update={"kill_grace_s": 0.5})):
        job = enqueue(r, keys, command=f"{marker} & {marker}; wait", timeout=1)
        procs = wait_for(lambda: len(processes(marker)) == 2 and processes(marker),
                         what="both sleeps")
        h = wait_done(r, keys, job)
        doc = job_from_hash(h)
        assert (doc.state, doc.exit_code, doc.reason) == ("failed", None, "timeout")
        assert doc.error == "timed out after 1s"
        assert gone(procs)
        assert processes(marker) == []


def test_cancel_through_pubsub(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    # heartbeats 30 s apart: only the control channel can deliver this cancel in time
    quiet = settings.model_copy(update={"heartbeat_s": 30.0, "worker_ttl_s": 90.0})
    with serving(quiet):
        job = enqueue(r, keys, command=["sleep", "92"])
        wait_for(lambda: state(r, keys, job) == "running" and processes("sleep 92"))
        procs = processes("sleep 92")
        out = sc.Scripts(r).run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN,
                                          ttl_s=60))
        assert out == "cancelling"
        h = wait_done(r, keys, job, timeout=5)
        assert (h["state"], h["reason"]) == ("cancelled", "cancelled")
        assert gone(procs)


def test_cancel_flag_seen_by_the_heartbeat(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings):
        job = enqueue(r, keys, command=["sleep", "91"])
        wait_for(lambda: state(r, keys, job) == "running" and processes("sleep 91"))
        r.hset(keys.job(job), "cancel", "1")  # no PUBLISH: a lost pub/sub message
        h = wait_done(r, keys, job, timeout=5)
    assert (h["state"], h["reason"]) == ("cancelled", "cancelled")
    assert processes("sleep 91") == []


def test_binary_output_and_a_huge_line(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    with serving(settings):
        binary = enqueue(r, keys, command="head -c 10000 /dev/urandom")
        huge = enqueue(r, keys, command="head -c 204800 /dev/zero | tr '\\0' a; echo; echo end")
        hb, hh = wait_done(r, keys, binary), wait_done(r, keys, huge)
    assert hb["state"] == "completed"
    assert "\ufffd" in "".join(log_lines(r, keys, binary, "o"))
    assert hh["state"] == "completed"
    entries = [f for _, f in r.xrange(keys.log(huge))]
    chunk = settings.log_line_max_bytes
    assert [len(f["l"]) for f in entries] == [chunk, chunk, chunk, 204800 - 3 * chunk, 3]
    assert [f.get("c") for f in entries] == ["1", "1", "1", None, None]
    assert "".join(f["l"] for f in entries[:4]) == "a" * 204800


# -- python jobs ------------------------------------------------------------------------


def test_python_jobs(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    with serving(settings):
        echo = enqueue(r, keys, kind="python", function="common.tasks:echo",
                       args=[1, "two", {"x": None}])
        fail = enqueue(r, keys, kind="python", function="common.tasks:fail", args=["boom"])
        denied = enqueue(r, keys, kind="python", function="os:getcwd")
        he, hf, hd = (wait_done(r, keys, j) for j in (echo, fail, denied))
    assert he["state"] == "completed"
    assert orjson.loads(he["result"]) == [1, "two", {"x": None}]
    assert job_from_hash(he).result == [1, "two", {"x": None}]
    assert (hf["state"], hf["reason"], hf["error"]) == ("failed", "exception", "RuntimeError: boom")
    err = log_lines(r, keys, fail, "e")
    assert err[0] == "Traceback (most recent call last):" and err[-1] == "RuntimeError: boom"
    assert (hd["state"], hd["reason"]) == ("failed", "not_allowed")


def test_allow_module_admits_submodules(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    with serving(settings.model_copy(update={"allow_modules": ["json"]})):
        job = enqueue(r, keys, kind="python", function="json.decoder:scanstring",
                      args=['ab"', 0])
        h = wait_done(r, keys, job)
    assert h["state"] == "completed" and orjson.loads(h["result"]) == ["ab", 3]


def until_cancelled(ctx: JobContext) -> str:
    """A cooperative python job: works until told to stop."""
    ctx.log("waiting")
    while not ctx.wait(5.0):
        pass
    return "stopped"


def test_python_job_cancel_is_cooperative(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    allowed = settings.model_copy(update={"allow_modules": [__name__]})
    with serving(allowed):
        job = enqueue(r, keys, kind="python", function=f"{__name__}:until_cancelled")
        wait_for(lambda: log_lines(r, keys, job) == ["waiting"], what="the job to log")
        out = sc.Scripts(r).run(sc.cancel(keys, job, "default", by="alice", events_maxlen=MAXLEN,
                                          ttl_s=60))
        assert out == "cancelling"
        h = wait_done(r, keys, job, timeout=5)
    assert (h["state"], h["reason"]) == ("cancelled", "cancelled")


# -- retries, slots, heartbeat, fencing, shutdown ---------------------------------------


def test_failure_with_retries_goes_to_the_delayed_set(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings):
        job = enqueue(r, keys, command="exit 1", retries=1, retry_delay=5)
        h = wait_done(r, keys, job)
    assert (h["state"], h["reason"], h["exit_code"]) == ("retrying", "exit_code", "1")
    due = r.zscore(keys.delayed(), job)
    assert due is not None and due == float(h["retry_at"])
    started = int(h["started_at"])
    assert started + 4_000 <= due <= started + 7_000  # 5 s ± 10 % jitter (+ run time)


def test_never_more_running_than_slots(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    jobs = [enqueue(r, keys, command=["sleep", "0.3"]) for _ in range(5)]
    seen: list[int] = []

    def sample() -> bool:
        pipe = r.pipeline(transaction=False)
        for job in jobs:
            pipe.hget(keys.job(job), "state")
        states = pipe.execute()
        seen.append(max(states.count("running"), len(worker.running_ids())))
        return all(s == "completed" for s in states)

    with serving(settings.model_copy(update={"concurrency": 2})) as worker:
        wait_for(sample, timeout=15, interval=0.01, what="all five jobs")
    assert max(seen) == 2


def test_heartbeat_registers_the_worker(settings: Settings, keys: Keys, r: redis.Redis) -> None:
    with serving(settings.model_copy(update={"queues": ["default", "gpu"]})) as worker:
        h = wait_for(lambda: r.hgetall(keys.worker(worker.id)), what="the worker hash")
        ttl = r.pttl(keys.worker(worker.id))
        assert 0 < ttl <= 3000
        assert r.zscore(keys.workers(), worker.id) is not None
        job = enqueue(r, keys, queue="gpu", command=["sleep", "90"])
        wait_for(lambda: r.hget(keys.worker(worker.id), "running") == job, what="running")
        assert r.hget(keys.job(job), "worker") == worker.id
    assert h["queues"] == "default,gpu" and h["slots"] == str(settings.concurrency)
    assert h["pid"].isdigit() and int(h["started_at"]) > 0 and h["version"] == "0.1.0"
    assert h["hostname"] and h["running"] == ""
    assert processes("sleep 90") == []


def test_a_job_lost_before_it_started_is_never_started(
    settings: Settings, keys: Keys, r: redis.Redis, tmp_path: Any
) -> None:
    """The worker stalls between start.lua and the spawn for more than half its TTL (as
    when it froze there) and the attempt is given to someone else meanwhile: the lease
    start.lua reported no longer covers the spawn, the lease check before it beats and
    finds out, and the job's process never runs."""
    reassigned: list[str] = []
    quick = settings.model_copy(update={"worker_ttl_s": 1.0, "heartbeat_s": 0.2})

    def prepare(worker: Worker) -> None:
        real = worker.scripts.run

        def reclaimed_meanwhile(call: sc.Call, pipe: Any = None) -> Any:
            out = real(call, pipe)
            if call.script == "start" and not reassigned:
                job_id = call.keys[-1].rsplit(":", 1)[1]
                time.sleep(quick.worker_ttl_s * 0.75)  # the stall (fault injection)
                r.hset(keys.job(job_id), "dispatch_id", "1-1")  # another attempt's token
                reassigned.append(job_id)
            return out

        worker.scripts.run = reclaimed_meanwhile  # type: ignore[method-assign]

    marker = tmp_path / "ran"
    with serving(quick, prepare) as worker:
        job = enqueue(r, keys, command=f"touch {marker}")
        wait_for(lambda: reassigned and not worker.running_ids(), what="the attempt dropped")
        other = enqueue(r, keys, command=["true"])
        assert wait_done(r, keys, other)["state"] == "completed"
    assert reassigned == [job] and not marker.exists()
    assert (r.hget(keys.job(job), "state"), r.hget(keys.job(job), "dispatch_id")) == (
        "running", "1-1")  # nothing written for the lost attempt


def test_stale_attempt_is_dropped_and_the_worker_goes_on(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings) as worker:
        job = enqueue(r, keys, command=["sleep", "0.5"])
        wait_for(lambda: state(r, keys, job) == "running")
        r.hset(keys.job(job), "dispatch_id", "1-1")  # as if re-dispatched to someone else
        wait_for(lambda: not worker.running_ids(), what="the attempt to end")
        assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 1
        assert state(r, keys, job) == "running"  # the stale finish changed nothing
        other = enqueue(r, keys, command=["true"])
        assert wait_done(r, keys, other)["state"] == "completed"


@pytest.mark.parametrize("applied", [True, False])
def test_start_reply_lost_is_settled(
    settings: Settings, keys: Keys, r: redis.Redis, applied: bool
) -> None:
    """A start call fails once: after the script ran (reply lost) or before it did."""
    failed: list[str] = []

    def prepare(worker: Worker) -> None:
        real = worker.scripts.run

        def flaky(call: sc.Call, pipe: Any = None) -> Any:
            if call.script == "start" and not failed:
                failed.append(call.script)
                if applied:
                    real(call, pipe)
                raise redis.TimeoutError("reply lost")
            return real(call, pipe)

        worker.scripts.run = flaky  # type: ignore[method-assign]

    with serving(settings, prepare):
        job = enqueue(r, keys, command=["echo", "once"])
        h = wait_done(r, keys, job)
    assert failed
    assert (h["state"], h["attempt"]) == ("completed", "1")
    assert log_lines(r, keys, job) == ["once"]
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0


@pytest.mark.parametrize("worker_dispatch", [True, False])
def test_read_reply_lost_is_recovered_by_the_live_worker(
    settings: Settings, keys: Keys, r: redis.Redis, worker_dispatch: bool
) -> None:
    """XREADGROUP ran on the server but its reply never arrived: the entries sit in this
    live worker's pending list, where neither `>` nor the reaper (dead workers only)
    looks. The worker reads its own pending entries after the failure and runs them."""
    lost: list[str] = []

    def prepare(worker: Worker) -> None:
        def reply_lost(reply: Any) -> Any:
            if not lost and any(items for _stream, items in reply or []):
                lost.extend(f["id"] for _s, items in reply for _e, f in items)
                raise redis.ConnectionError("connection reset while reading the reply")
            return reply

        if worker_dispatch:
            real_execute = worker.scripts.execute

            def execute(build: Any, **kw: Any) -> list[Any]:
                got = real_execute(build, **kw)
                got[-1] = reply_lost(got[-1])  # the XREADGROUP is the batch's last command
                return got

            worker.scripts.execute = execute  # type: ignore[method-assign]
        else:
            real_read = worker.client.xreadgroup

            def xreadgroup(*args: Any, **kw: Any) -> Any:
                reply = real_read(*args, **kw)
                return reply_lost(reply) if ">" in args[2].values() else reply

            worker.client.xreadgroup = xreadgroup  # type: ignore[method-assign]

    one = settings.model_copy(update={"worker_dispatch": worker_dispatch})
    with serving(one, prepare):
        job = enqueue(r, keys, command=["echo", "found"])
        h = wait_done(r, keys, job)
    assert lost == [job]
    assert (h["state"], h["attempt"]) == ("completed", "1")
    assert log_lines(r, keys, job) == ["found"]
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0


@pytest.mark.parametrize("applied", [True, False])
def test_finish_is_retried(settings: Settings, keys: Keys, r: redis.Redis, applied: bool) -> None:
    failed: list[str] = []

    def prepare(worker: Worker) -> None:
        real = worker.scripts.run

        real_many = worker.scripts.run_many

        def flaky(call: sc.Call, pipe: Any = None) -> Any:
            if call.script in ("finish", "heartbeat") and call.script not in failed:
                failed.append(call.script)  # the first of each: at start-up, at the end
                if applied:
                    real(call, pipe)
                raise redis.ConnectionError("connection reset")
            return real(call, pipe)

        def flaky_many(calls: list[sc.Call], **kw: Any) -> list[Any]:
            first = calls[0].script
            if first == "finish" and first not in failed:  # the finisher's batched path
                failed.append(first)
                if applied:
                    real_many(calls, **kw)
                raise redis.ConnectionError("connection reset")
            return real_many(calls, **kw)

        worker.scripts.run = flaky  # type: ignore[method-assign]
        worker.scripts.run_many = flaky_many  # type: ignore[method-assign]

    one = settings.model_copy(update={"concurrency": 1})
    with serving(one, prepare):
        first = enqueue(r, keys, command="exit 2", retries=0)
        second = enqueue(r, keys, command=["true"])
        h1, h2 = wait_done(r, keys, first), wait_done(r, keys, second)
    assert sorted(failed) == ["finish", "heartbeat"]
    assert (h1["state"], h1["exit_code"]) == ("failed", "2")
    assert h2["state"] == "completed"
    finished = [f["state"] for _, f in r.xrange(keys.events()) if f["job"] == first]
    assert finished.count("failed") == 1


def test_malformed_dispatch_entry_is_dropped(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    ensure_group(r, keys.dispatch("default"), GROUP_WORKERS)
    r.xadd(keys.dispatch("default"), {"junk": "1"})
    with serving(settings):
        wait_for(lambda: r.xlen(keys.dispatch("default")) == 0, what="the entry dropped")
        job = enqueue(r, keys, command=["true"])
        assert wait_done(r, keys, job)["state"] == "completed"
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0


def last_event(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, str]:
    return [f for _, f in r.xrange(keys.events()) if f["job"] == job_id][-1]


@pytest.mark.timeout(30)
def test_graceful_stop_hands_back_what_outlives_the_grace(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    # three slots, all busy: the fourth entry is read by the test under the worker's name
    graced = settings.model_copy(update={"kill_grace_s": 0.5, "shutdown_grace_s": 1.0,
                                         "concurrency": 3})
    worker = Worker(graced, block_ms=100)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        short = enqueue(r, keys, command="sleep 0.6; echo done")
        long = enqueue(r, keys, command=["sleep", "89"], retries=1)
        py = enqueue(r, keys, kind="python", function="common.tasks:sleep", args=[1.5])
        wait_for(lambda: all(state(r, keys, j) == "running" for j in (short, long, py)))
        procs = processes("sleep 89")
        # an entry read under the worker's name whose reply never arrived (never started)
        unread = enqueue(r, keys, command=["true"])
        r.xreadgroup(GROUP_WORKERS, worker.id, {keys.dispatch("default"): ">"})
        stopped_at = monotonic()
        worker.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()
        took = monotonic() - stopped_at
    finally:
        worker.stop(force=True)
        thread.join(timeout=10)
    hs, hl, hp, hu = (r.hgetall(keys.job(j)) for j in (short, long, py, unread))
    assert hs["state"] == "completed" and log_lines(r, keys, short) == ["done"]
    # handed back at once: queued again with their old place, no retry spent
    for h, job in ((hl, long), (hp, py), (hu, unread)):
        assert (h["state"], h["dispatch_id"], h["worker"]) == ("queued", "", "")
        assert r.zscore(keys.queue("default"), job) == float(h["score"])
        event = last_event(r, keys, job)
        assert (event["state"], event["reason"]) == ("queued", "handed_back")
        assert "lost" not in h  # a hand-back is no lost delivery: never makes a job poison
    # the started ones are counted apart
    assert (hl["handed_back"], hp["handed_back"], hu.get("handed_back")) == ("1", "1", None)
    assert worker.handed_back == 3 and worker.abandoned == 1
    assert gone(procs)
    assert took < 1.0 + 0.5 + 3.0  # the grace, the kill grace, and a little
    assert r.xpending(keys.dispatch("default"), GROUP_WORKERS)["pending"] == 0
    # it left nothing behind: no consumer, no heartbeat
    consumers = r.xinfo_consumers(keys.dispatch("default"), GROUP_WORKERS)
    assert worker.id not in {c["name"] for c in consumers}
    assert not r.exists(keys.worker(worker.id))
    assert r.zscore(keys.workers(), worker.id) is None


@pytest.mark.timeout(60)
def test_worker_process_exits_0_on_sigterm(
    settings: Settings, keys: Keys, r: redis.Redis, tmp_path: Any
) -> None:
    """`worker.main.run` in its own process: SIGTERM lets the running job finish."""
    env = {
        **os.environ,
        "TIDAL_REDIS_URL": settings.redis_url,
        "TIDAL_PREFIX": settings.prefix,
        "TIDAL_HEARTBEAT_S": "0.5",
        "TIDAL_LOG_FORMAT": "json",
        "TIDAL_SHUTDOWN_GRACE_S": "10",
    }
    code = "from common.settings import Settings; from worker.main import run; run(Settings())"
    log_file = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    try:
        job = enqueue(r, keys, command="sleep 0.5; echo finished")
        wait_for(lambda: state(r, keys, job) == "running", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    assert state(r, keys, job) == "completed"
    assert log_lines(r, keys, job) == ["finished"]
    lines = [orjson.loads(line) for line in (tmp_path / "worker.log").read_bytes().splitlines()]
    assert {"worker starting", "job finished", "worker stopped"} <= {x["event"] for x in lines}
    assert all(x.get("service") == "worker" and x.get("worker_id") for x in lines)


def test_worker_dispatches_for_its_free_slots_and_settles_what_it_finished(
    r: redis.Redis, keys: Keys, settings: Settings,
) -> None:
    """No scheduler dispatches here: the worker sends the queued jobs itself, in the round
    trip of its reads, bounded by the capacity a scheduler would publish."""
    r.hset(keys.capacity("default"), mapping={
        "slots": 2, "cpu": 8, "memory_mb": 8192, "gpu": 0, "max_cpu": 8,
        "max_memory_mb": 8192, "max_gpu": 0})
    jobs = [enqueue(r, keys, dispatch=False, command="true") for _ in range(5)]
    with serving(settings.model_copy(update={"concurrency": 2})) as worker:
        wait_for(lambda: all(r.hget(keys.job(j), "state") == "completed" for j in jobs),
                 timeout=15)
    by = {f["by"] for _, f in r.xrange(keys.events()) if f.get("state") == "dispatched"}
    assert by == {worker.id}
    assert r.xlen(keys.dispatch("default")) == 0
    # and it settled them itself (no host, no dependents): nothing for a scheduler to do
    assert r.xlen(keys.settle()) == 0 and int(r.hget(keys.user("alice"), "active")) == 0
