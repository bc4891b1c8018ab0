"""Schedulers, Redis and the recorder dying under load (RELIABILITY.md F4, F5, F13)."""

from __future__ import annotations

import random
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlmodel import Session, col, func, select

from common.db import make_engine
from common.doctor import Doctor
from common.keys import GROUP_SCHEDULERS
from common.tables import EventRecord, JobRecord
from tests.e2e.conftest import tidal_cmd
from tests.faults.conftest import ADMIN, TERMINAL, Cluster, figures, monotonic, terminal_events
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def mirror_findings(c: Cluster) -> list[Any]:
    engine = make_engine(c.settings)
    try:
        return Doctor(c.redis, c.keys, c.settings, engine).examine()
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_f4_schedulers_killed_in_a_loop_during_a_burst(cluster: Cluster) -> None:
    """Two schedulers, one of them kill -9'd (and restarted) every 0.3-1 s while 400 jobs
    are submitted: every job is admitted once and ends once; nothing stays pending."""
    c = cluster
    env = {"TIDAL_RECLAIM_IDLE_S": "1"}
    c.api()
    c.scheduler("s1", **env)
    c.scheduler("s2", **env)
    c.worker("w1", "-c", "8")
    c.worker("w2", "-c", "8")
    c.wait_workers("w1", "w2")
    ids: list[str] = []
    kills = 0
    stop = threading.Event()

    def submit_burst() -> None:
        for _ in range(8):
            ids.extend(c.submit([{"command": ["true"]}] * 50))

    submitter = threading.Thread(target=submit_burst)
    submitter.start()
    rng = random.Random(4)
    started = monotonic()
    while not stop.is_set() and monotonic() - started < 8:
        name = "s1" if kills % 2 == 0 else "s2"
        c.kill(name)
        c.scheduler(name, **env)
        kills += 1
        stop.wait(rng.uniform(0.3, 1.0))
    submitter.join(30)
    healed_at = monotonic()
    states = c.wait_terminal(ids, timeout=60)
    recovery = monotonic() - healed_at
    wait_for(lambda: c.redis.xpending(c.keys.submissions(), GROUP_SCHEDULERS)["pending"] == 0,
             timeout=20, what="an empty submissions PEL")
    events = c.events()
    admitted = Counter(e["job"] for e in events if e["state"] == "queued")
    ends = terminal_events(events)
    assert len(ids) == 400 and set(states.values()) == {"completed"}
    assert admitted == dict.fromkeys(ids, 1)  # admitted exactly once
    assert ends == dict.fromkeys(ids, 1)
    assert c.redis.xlen(c.keys.submissions()) == 0
    figures("F4 scheduler kill -9 loop", submitted=400, accepted=len(ids), lost=0,
            duplicated=sum(n - 1 for n in ends.values()), faults=kills, recovery_s=recovery)


@pytest.mark.timeout(120)
def test_f5_redis_killed_during_submissions(cluster: Cluster) -> None:
    """Four clients submit while Redis is kill -9'd and restarted on the same files (AOF,
    `appendfsync always` as shipped): every job answered 202 exists afterwards and ends;
    while Redis is down the API answers 503, never 500; every service reconnects by itself.
    (Under everysec this failed once in CI, on a busy disk: test_busy_disk_crash.py.)"""
    c = cluster
    c.api()
    c.scheduler()
    c.worker("w1", "-c", "8")
    c.wait_workers("w1")
    assert c.http.get("/healthz").status_code == 200
    history: list[tuple[float, int | str, str | None]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=c.api_url, timeout=5.0,
                          headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"command": ["true"], "idempotency_key": f"c{n}-{i}"}
                try:
                    r = http.post("/jobs", json=body)
                    job = r.json().get("id") if r.status_code == 202 else None
                    history.append((monotonic(), r.status_code, job))
                except httpx.HTTPError as exc:
                    history.append((monotonic(), type(exc).__name__, None))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(1 for _, s, _ in history if s == 202) >= 100, timeout=30)
        killed_at = monotonic()
        c.kill_redis()
        wait_for(lambda: sum(1 for t, s, _ in history if t > killed_at and s == 503) >= 20,
                 timeout=30, what="503 answers while Redis is down")
        restarted_at = monotonic()
        c.restart_redis()
        first_ok = wait_for(lambda: next((t for t, s, _ in history
                                          if t > restarted_at and s == 202), None), timeout=30)
        wait_for(lambda: sum(1 for t, s, _ in history if t > first_ok and s == 202) >= 100,
                 timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    accepted = [job for _, s, job in history if s == 202 and job]
    statuses = Counter(s for _, s, _ in history)
    present = c.states(accepted)
    lost = [j for j, s in present.items() if s is None]
    assert lost == []
    assert statuses[500] == 0 and statuses[503] >= 20
    c.wait_terminal(accepted, timeout=60)
    assert terminal_events(c.events()).keys() >= set(accepted)
    figures("F5 Redis kill -9 (AOF always)", submitted=len(history), accepted=len(accepted),
            lost=len(lost), duplicated=0, faults=1, recovery_s=first_ok - restarted_at,
            http_503=statuses[503], http_500=statuses[500],
            indeterminate=sum(n for s, n in statuses.items() if isinstance(s, str)))


@pytest.mark.timeout(120)
def test_f13_recorder_down_then_back_converges(cluster: Cluster, tmp_path: Path) -> None:
    """A burst runs with no recorder; then one comes back (in a second scheduler), is
    kill -9'd mid catch-up and restarted: the SQL mirror converges to Redis, one event row
    per event, one terminal event per job, and `tidal doctor` reports nothing."""
    c = cluster
    c.api()
    c.scheduler("s1", TIDAL_RECORDER="false")
    c.worker("w1", "-c", "8")
    c.worker("w2", "-c", "8")
    c.wait_workers("w1", "w2")
    ids: list[str] = []
    for _ in range(6):
        ids += c.submit([{"command": ["true"]}, {"kind": "python", "function":
                                                 "common.tasks:echo", "args": [1]}] * 25)
    c.wait_terminal(ids, timeout=60)
    behind = mirror_findings(c)
    assert {f.check for f in behind} >= {"recorder_behind", "mirror_missing"}
    back_at = monotonic()
    c.scheduler("recorder", TIDAL_RECORDER="true")
    engine = make_engine(c.settings)
    try:
        def rows() -> int:
            with Session(engine) as s:
                return int(s.exec(select(func.count()).select_from(JobRecord)).one())

        wait_for(lambda: rows() > 0, timeout=30, what="the recorder to start")
        c.kill("recorder")  # mid catch-up, or just after it
        c.scheduler("recorder", TIDAL_RECORDER="true")
        wait_for(lambda: not mirror_findings(c), timeout=60, interval=0.5,
                 what="the mirror to converge")
        converged = monotonic() - back_at
        with Session(engine) as s:
            terminal_rows = s.exec(select(EventRecord.job_id, func.count()).where(
                col(EventRecord.state).in_(TERMINAL)).group_by(EventRecord.job_id)).all()
            states = set(s.exec(select(JobRecord.state)).all())
            events_rows = int(s.exec(select(func.count()).select_from(EventRecord)).one())
    finally:
        engine.dispose()
    assert dict(terminal_rows) == dict.fromkeys(ids, 1) and states == {"completed"}
    assert events_rows == len(c.events())
    out = subprocess.run(tidal_cmd("doctor", "--json"), cwd=tmp_path, env=c.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert orjson.loads(out.stdout)["findings"] == []
    figures("F13 recorder down, then back", submitted=len(ids), accepted=len(ids), lost=0,
            duplicated=0, faults=1, recovery_s=converged, diffs_before=len(behind),
            events=events_rows)
