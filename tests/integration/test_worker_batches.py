"""Quick python jobs run in batches by one runner thread (worker/service.py): a job of a
quick function that turns out slow must not hold up the jobs queued behind it, and a spec
the worker cannot read fails its job, not the worker."""

from __future__ import annotations

import threading

import redis

from common import scripts as sc
from common.keys import Keys
from common.settings import Settings
from tests.integration.harness import MAXLEN, Harness
from tests.integration.test_worker_service import enqueue, serving, wait_done
from worker.service import Worker

GATE = threading.Event()


def gated(block: bool = False) -> str:
    """Quick, unless asked to wait for the test's gate."""
    if block:
        GATE.wait(30)
    return "done"


def test_a_quick_function_that_blocks_does_not_hold_up_the_batch(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    function = f"{__name__}:gated"
    GATE.clear()
    # the whole batch is read at once and the function counts as quick: ONE runner
    # is woken for all four, and takes the blocking job first
    blocked = enqueue(r, keys, kind="python", function=function, kwargs={"block": True})
    others = [enqueue(r, keys, kind="python", function=function) for _ in range(3)]

    def quick(worker: Worker) -> None:
        worker._quick[function] = True

    allowed = settings.model_copy(update={"allow_modules": [__name__], "concurrency": 4})
    try:
        with serving(allowed, prepare=quick):
            for job in others:  # while the first job still waits for the gate
                h = wait_done(r, keys, job)
                assert (h["state"], h["result"]) == ("completed", '"done"')
            assert r.hget(keys.job(blocked), "state") == "running"
            GATE.set()
            assert wait_done(r, keys, blocked)["state"] == "completed"
    finally:
        GATE.set()


def test_a_spec_that_does_not_read_fails_its_job_and_the_worker_goes_on(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    broken = enqueue(r, keys, kind="python", function="common.tasks:noop")
    r.hset(keys.job(broken), "spec", "{not json")
    out_of_range = enqueue(r, keys, kind="python", function="common.tasks:noop")
    r.hset(keys.job(out_of_range), "spec",
           '{"kind": "python", "function": "common.tasks:noop", "timeout": -1}')
    unknown = enqueue(r, keys, kind="python", function="common.tasks:noop")
    r.hset(keys.job(unknown), "spec",
           '{"kind": "python", "function": "common.tasks:noop", "surprise": 1}')
    with serving(settings):
        for job in (broken, out_of_range, unknown):
            h = wait_done(r, keys, job)
            assert (h["state"], h["reason"]) == ("failed", "invalid_spec")
            assert h["error"].startswith("invalid spec: ")
        fine = enqueue(r, keys, kind="python", function="common.tasks:echo", args=[7])
        h = wait_done(r, keys, fine)
    assert (h["state"], h["result"]) == ("completed", "7")


def test_a_python_job_that_never_logs_writes_no_log(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    with serving(settings):
        quiet = enqueue(r, keys, kind="python", function="common.tasks:noop")
        loud = enqueue(r, keys, kind="python", function="common.tasks:fail", args=["loud"])
        assert wait_done(r, keys, quiet)["state"] == "completed"
        assert wait_done(r, keys, loud)["state"] == "failed"
    assert r.exists(keys.log(quiet)) == 0
    lines = [f["l"] for _, f in r.xrange(keys.log(loud))]
    assert lines[-1] == "RuntimeError: loud"


def test_a_finish_batch_that_fails_midway_finishes_the_rest_one_by_one(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    """finish.lua's batch mode stops at a job whose keys are damaged (scripts don't roll
    back): the worker then finishes each job by its own call, so the others complete."""
    h = Harness(r, keys, settings)
    worker = Worker(settings, client=r)
    h.worker(worker.id, slots=3)
    first, damaged, last = h.submit(), h.submit(), h.submit()
    h.step()
    h.take(worker.id)
    r.set(keys.done(damaged), "not a stream")  # its done-stream XADD fails inside the script
    calls = [sc.finish(keys, job, "default", h.running[job].token, sc.Outcome("completed", 0),
                       worker=worker.id, retry_delay_ms=0, events_maxlen=MAXLEN, ttl_s=3600)
             for job in (first, damaged, last)]
    answers = worker._finish_calls(calls)
    assert answers[0] in ("completed", -1) and answers[2] == "completed"
    assert isinstance(answers[1], redis.ResponseError) or answers[1] == -1
    assert [h.state(j) for j in (first, damaged, last)] == ["completed"] * 3
