"""The scheduler's hot path against a real server: a batch of settle entries in one
settle.lua call (no dependents lookup for jobs that have none), the loop woken by a finish,
dispatch bounded by the free slots, the loop latency in GET /metrics, and the recorder's
new columns (and the columns added to an old database)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, inspect, text
from sqlmodel import Session, select

from common import scripts as sc
from common.db import make_engine
from common.keys import GROUP_RECORDER, GROUP_SCHEDULERS, Keys
from common.settings import Settings
from common.streams import ensure_group
from common.tables import JobRecord
from scheduler.recorder import FULL_COLUMNS, Recorder, job_row, job_values
from tests.integration.harness import Harness


@pytest.fixture
def h(r: redis.Redis, keys: Keys, settings: Settings) -> Harness:
    return Harness(r, keys, settings)


def calls(r: redis.Redis, command: str) -> int:
    """How many times the server ran `command` (commands inside scripts included)."""
    stats = r.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def active(r: redis.Redis, keys: Keys, user: str = "alice") -> int:
    return int(r.hget(keys.user(user), "active") or 0)


# -- settle ---------------------------------------------------------------------------


def test_a_batch_of_plain_jobs_settles_in_one_call_without_reading_dependents(
    h: Harness, r: redis.Redis, keys: Keys
) -> None:
    h.worker("w1", slots=20)
    jobs = [h.submit() for _ in range(20)]
    h.step()
    assert sorted(h.take("w1")) == sorted(jobs)
    for job in jobs:
        h.finish(job)
    assert r.xlen(keys.settle()) == 20 and active(r, keys) == 20
    r.script_load(sc.source("settle"))  # so no NOSCRIPT reply counts below
    smembers, evalsha = calls(r, "smembers"), calls(r, "evalsha")
    assert h.schedulers[0].settler.settle() == 20
    assert calls(r, "smembers") == smembers  # no job had dependents: none was looked up
    assert calls(r, "evalsha") == evalsha + 1  # one settle.lua call for the whole batch
    assert r.xlen(keys.settle()) == 0 and active(r, keys) == 0
    assert r.xpending(keys.settle(), GROUP_SCHEDULERS)["pending"] == 0


def test_one_batch_hands_hosts_on_and_tells_dependents(h: Harness, r: redis.Redis) -> None:
    h.worker("w1", slots=10)
    a = h.submit(host="h1")
    waiter = h.submit(host="h1")
    parent = h.submit()
    child = h.submit(depends_on=[parent])
    doomed = h.submit()
    victim = h.submit(depends_on=[doomed])
    grandchild = h.submit(depends_on=[victim])
    plain = h.submit()
    h.step()
    assert h.field(waiter, "wait_reason") == "host:h1"
    assert sorted(h.take("w1")) == sorted([a, parent, doomed, plain])
    for job, state in ((a, "completed"), (parent, "completed"), (doomed, "failed"),
                       (plain, "completed")):
        h.finish(job, state, 0 if state == "completed" else 1)
    h.step()  # all four settle in one batch; the failure runs down the chain
    assert r.get(h.keys.host("h1")) == waiter
    assert h.state(child) in ("queued", "dispatched")
    assert h.field(child, "wait_reason") != "dependencies"
    assert (h.state(victim), h.field(victim, "reason")) == ("failed", "dependency_failed")
    assert (h.state(grandchild), h.field(grandchild, "reason")) == ("failed", "dependency_failed")
    assert sorted(h.take("w1")) == sorted([waiter, child])
    assert active(r, h.keys) == 2  # waiter and child still run; every ended job counted off
    assert r.xlen(h.keys.settle()) == 0


def test_a_settle_entry_processed_twice_counts_once(h: Harness, r: redis.Redis) -> None:
    """A scheduler killed after settle.lua ran but before it learned so: another one
    (recover) runs the same entries again, and nothing moves twice."""
    h.worker("w1", slots=2)
    jobs = [h.submit(host="hx"), h.submit(host="hx"), h.submit()]
    h.step()
    for job in h.take("w1"):
        h.finish(job)
    s = h.schedulers[0]
    got = r.xreadgroup(GROUP_SCHEDULERS, "dead", {h.keys.settle(): ">"}, count=10)
    items = [item for _s, batch in got for item in batch]
    assert len(items) == 2
    s.settler.process(items)
    s.settler.process(items)  # the replay
    assert active(r, h.keys) == 1  # only the waiter is left
    assert r.get(h.keys.host("hx")) == jobs[1]
    assert h.state(jobs[1]) == "queued"


# -- the loop ---------------------------------------------------------------------------


def test_a_finish_wakes_the_blocked_loop_which_settles_and_refills(
    h: Harness, r: redis.Redis
) -> None:
    h.worker("w1", slots=1)
    first, second = h.submit(host="h2"), h.submit(host="h2")
    h.step()
    assert h.take("w1") == [first]
    s = h.schedulers[0]
    assert s.step(block_ms=0) == 0  # nothing to do: the loop would block now
    done: list[int] = []
    blocked = threading.Thread(target=lambda: done.append(s.step(block_ms=120_000)))
    blocked.start()
    h.finish(first)  # appends to the settle stream: the blocked read returns with it
    blocked.join(timeout=60)  # a liveness bound, far below the block, not a timing figure
    assert not blocked.is_alive() and done and done[0] >= 1
    assert r.get(h.keys.host("h2")) == second
    s.step(block_ms=0)
    assert h.state(second) == "dispatched"


def test_a_job_submitted_to_an_idle_queue_goes_out_in_the_admitting_round_trip(
    h: Harness, r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Admission and dispatch of a lone job share one round trip (dispatch.lua right
    after admit.lua, head-checked); behind older queued jobs it waits its turn."""
    h.worker("w1", slots=2)
    s = h.schedulers[0]
    s.step(block_ms=0)  # counts the live workers and publishes their capacity
    for name in ("admit", "dispatch"):  # so no NOSCRIPT reply makes a pass re-send
        r.script_load(sc.source(name))
    trips = 0
    execute = s.ctx.execute

    def counted(build: Any) -> list[Any]:
        nonlocal trips
        trips += 1
        return execute(build)

    monkeypatch.setattr(s.ctx, "execute", counted)
    job = h.submit()
    s.step(block_ms=0)
    assert h.state(job) == "dispatched" and trips == 1
    # a full queue, then a slot frees: a new job behind an older one does not jump it
    busy = h.submit()
    s.step(block_ms=0)
    low = h.submit(priority="low")
    s.step(block_ms=0)
    assert sorted(h.take("w1")) == sorted([job, busy]) and h.state(low) == "queued"
    h.finish(job)
    later = h.submit(priority="low")
    s.step(block_ms=0)
    assert h.state(low) == "dispatched" and h.state(later) == "queued"
    assert r.xlen(h.keys.dispatch("default")) == 2


def test_two_schedulers_reading_both_streams_never_overfill_the_slots(
    h: Harness, r: redis.Redis
) -> None:
    h.add_scheduler()
    h.worker("w1", slots=3)
    jobs = [h.submit() for _ in range(12)]
    finished = 0
    while finished < len(jobs):
        for s in h.schedulers:
            s.step(block_ms=0)
            assert r.xlen(h.keys.dispatch("default")) <= 3
        for job in h.take("w1"):
            h.finish(job)
            finished += 1
    for _ in range(3):  # what a pass read ahead is handled by the scheduler's next one
        for s in h.schedulers:
            s.step(block_ms=0)
    assert not any(s.ahead for s in h.schedulers)
    assert all(h.state(j) == "completed" for j in jobs)
    assert active(r, h.keys) == 0 and r.xlen(h.keys.settle()) == 0


# -- metrics -----------------------------------------------------------------------------


def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_export_the_scheduler_loop_and_the_recorder_lag(
    client: TestClient, h: Harness
) -> None:
    s = h.schedulers[0]
    other = h.add_scheduler()
    ensure_group(h.r, h.keys.events(), GROUP_RECORDER)  # a recorder exists, and lags
    h.worker("w1", slots=2)
    h.submit()
    stop = threading.Timer(1.5, s.stop)  # about 1.5 s of the real loop, then it stops
    stop.start()
    s.run()
    s.publish_loop_stats()
    other.publish_loop_stats()  # a scheduler that ran no pass: a histogram of nothing
    m = scrape(client)
    mine = (("scheduler", s.me),)
    count = m["tidal_scheduler_loop_seconds_count"][mine]
    assert count >= 1
    assert m["tidal_scheduler_loop_seconds_bucket"][(("le", "+Inf"), ("scheduler", s.me))] == count
    assert m["tidal_scheduler_loop_seconds_sum"][mine] > 0
    assert m["tidal_scheduler_loop_max_seconds"][mine] >= 0
    assert m["tidal_scheduler_loop_seconds_count"][(("scheduler", other.me),)] == 0
    # the recorder's lag: the events of the job nobody recorded
    assert m["tidal_recorder_lag_entries"][()] >= 1
    assert "tidal_recorder_lag_seconds" in m
    # a scheduler whose entry lapsed is not exported
    h.r.delete(h.keys.scheduler_loop(other.me))
    assert (("scheduler", other.me),) not in scrape(client)["tidal_scheduler_loop_seconds_count"]


# -- recorder ----------------------------------------------------------------------------


def test_job_row_computes_wait_and_run() -> None:
    row = job_row("j", {"created_at": "1000", "scheduled_at": "5000", "started_at": "5200",
                        "finished_at": "5700", "peak_rss_kb": "2048", "cpu_s": "0.25",
                        "state": "completed"}, 5)
    assert (row["wait_ms"], row["run_ms"], row["peak_rss_kb"], row["cpu_s"]) == (200, 500, 2048,
                                                                                  0.25)
    # a retry's back-off came due at 9000 (promote_due.lua's due_at): the last attempt waited
    row = job_row("j", {"created_at": "1000", "due_at": "9000", "started_at": "9040",
                        "finished_at": "9050"}, 9)
    assert (row["wait_ms"], row["run_ms"]) == (40, 10)
    row = job_row("j", {"created_at": "1000", "state": "queued"}, 2)
    assert (row["wait_ms"], row["run_ms"], row["peak_rss_kb"], row["cpu_s"]) == (None,) * 4


def test_recorder_mirrors_usage_and_times_idempotently(
    h: Harness, r: redis.Redis, settings: Settings
) -> None:
    h.worker("w1", slots=5)
    jobs = [h.submit() for _ in range(5)]
    h.step()
    h.take("w1")
    for job in jobs:
        r.hset(h.keys.job(job), mapping={"peak_rss_kb": 1234, "cpu_s": "0.5"})  # as finish does
        h.finish(job)
    rec = Recorder(settings, r)
    assert rec.catch_up() == 5 * 5  # pending, queued, dispatched, running, completed
    rows = Session(rec.engine).exec(select(JobRecord)).all()
    assert len(rows) == 5
    for row in rows:
        assert row.state == "completed" and row.seq == 5
        assert row.peak_rss_kb == 1234 and row.cpu_s == 0.5
        assert row.wait_ms is not None and row.wait_ms >= 0
        assert row.run_ms is not None and row.run_ms >= 0
        assert row.wait_ms == row.started_at - row.created_at  # type: ignore[operator]
    # replaying the whole stream changes nothing
    r.xgroup_setid(h.keys.events(), "recorder", id="0")
    before = [tuple(x) for x in Session(rec.engine).exec(select(JobRecord)).all()]
    rec.catch_up()
    assert [tuple(x) for x in Session(rec.engine).exec(select(JobRecord)).all()] == before
    rec.engine.dispose()


def test_job_values_is_job_row_in_table_order() -> None:
    hashes = [
        {"created_at": "1000", "started_at": "1200", "finished_at": "1300", "state": "completed",
         "owner": "alice", "queue": "q", "kind": "python", "priority": "0", "attempt": "2",
         "exit_code": "0", "result": "[1]", "cpu_s": "0.5", "peak_rss_kb": "77", "host": "h1"},
        {"state": "queued", "priority": "", "attempt": "x", "cpu_s": "nan?", "owner": ""},
        {},
    ]
    for hash_ in hashes:
        row = job_row("j", hash_, 7)
        assert job_values("j", hash_, 7) == tuple(row[c] for c in FULL_COLUMNS)


def test_the_recorder_copies_only_logs_that_exist(
    h: Harness, r: redis.Redis, settings: Settings
) -> None:
    h.worker("w1", slots=4)
    quiet, chatty = h.submit(), h.submit()
    h.step()
    h.take("w1")
    r.xadd(h.keys.log(chatty), {"s": "o", "t": "1", "l": "hello"})
    h.finish(quiet)
    h.finish(chatty)
    rec = Recorder(settings, r)
    before = calls(r, "xrange")
    rec.catch_up()
    assert calls(r, "xrange") - before == 1  # the chatty job's log only
    with rec.engine.connect() as conn:
        lines = conn.execute(text("SELECT job_id, text FROM logs")).all()
    assert [tuple(x) for x in lines] == [(chatty, "hello")]
    rec.engine.dispose()


def test_an_old_database_gets_the_new_columns(tmp_path: Path, settings: Settings,
                                              r: redis.Redis) -> None:
    db = tmp_path / "old.db"
    old = create_engine(f"sqlite:///{db}")
    with old.begin() as conn:  # the jobs table as the first release made it
        conn.execute(text(
            "CREATE TABLE jobs (id VARCHAR NOT NULL PRIMARY KEY, owner VARCHAR NOT NULL, "
            "queue VARCHAR NOT NULL, state VARCHAR NOT NULL, kind VARCHAR NOT NULL, "
            "priority INTEGER NOT NULL, host VARCHAR, attempt INTEGER NOT NULL, worker VARCHAR, "
            "wait_reason VARCHAR, created_at INTEGER, started_at INTEGER, finished_at INTEGER, "
            "exit_code INTEGER, result VARCHAR, error VARCHAR, reason VARCHAR, "
            "spec VARCHAR NOT NULL, seq INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO jobs VALUES ('old', 'alice', 'default', 'completed', "
                          "'shell', 2, NULL, 1, NULL, NULL, 1, 2, 3, 0, NULL, NULL, NULL, "
                          "'{}', 5)"))
    old.dispose()
    engine = make_engine(settings.model_copy(update={"database_url": f"sqlite:///{db}"}))
    columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert {"wait_ms", "run_ms", "peak_rss_kb", "cpu_s"} <= columns
    make_engine(settings.model_copy(update={"database_url": f"sqlite:///{db}"})).dispose()
    with Session(engine) as session:
        row: Any = session.get(JobRecord, "old")
        assert row.state == "completed" and row.wait_ms is None
    engine.dispose()


def test_the_loop_survives_redis_forgetting_its_scripts(h: Harness, r: redis.Redis) -> None:
    """A restarted Redis (or SCRIPT FLUSH) answers NOSCRIPT inside the loop's pipelines:
    the scripts are loaded and only the calls that did not run are sent again."""
    h.worker("w1", slots=2)
    jobs = [h.submit() for _ in range(2)]
    r.script_flush()
    s = h.schedulers[0]
    s.step(block_ms=0)
    s.step(block_ms=0)
    assert sorted(h.take("w1")) == sorted(jobs)
    for job in jobs:
        h.finish(job)
    r.script_flush()
    s.step(block_ms=0)
    s.step(block_ms=0)
    assert int(r.hget(h.keys.user("alice"), "active") or 0) == 0
