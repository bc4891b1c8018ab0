"""The soak (RELIABILITY.md F20, bounded for CI): 2,000 short jobs (shell and python, some
retried, a quarter pinned to one of five hosts) while a nemesis kill -9s, freezes and
SIGTERMs workers and kill -9s schedulers, by PID, and restarts what it stopped. Then:
every accepted job ended exactly once in Redis and in the SQL mirror, none was lost, and
no two executions for one host overlapped."""

from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, func, select

from common.db import make_engine
from common.doctor import Doctor
from common.tables import EventRecord, JobRecord
from tests.faults import ledger
from tests.faults.conftest import FAST, TERMINAL, Cluster, figures, monotonic, terminal_events
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.soak]

JOBS = 2000
HOSTS = [f"h{i}" for i in range(5)]
WORKERS = ["w1", "w2", "w3"]
SCHEDULERS = ["s1", "s2"]
CHAOS_S = 30.0  # how long the nemesis acts
HOST_JOB_S = 0.05  # how long a host job runs (a killed one is taken to run 6x that)


def job_spec(i: int, book: Path) -> dict[str, Any]:
    if i % 4 == 0:
        host = HOSTS[i % len(HOSTS)]
        return {"command": ledger.shell_job(book, HOST_JOB_S, host=host), "host": host}
    if i % 4 == 1:
        return {"kind": "python", "function": "common.tasks:echo", "args": [i]}
    if i % 10 == 2:  # fails its first attempt, then succeeds
        return {"command": '[ "$TIDAL_ATTEMPT" -ge 2 ] || exit 1', "retries": 2,
                "retry_delay": 0.2}
    return {"command": ["true"]}


class Nemesis:
    """Picks a fault every 1-2 s and heals it; keeps count by kind."""

    def __init__(self, c: Cluster, seed: int = 20) -> None:
        self.c = c
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.faults: Counter[str] = Counter()

    def run(self) -> None:
        actions = [self.kill_worker, self.freeze_worker, self.kill_scheduler, self.term_worker]
        while not self.stop.wait(self.rng.uniform(1.0, 2.0)):
            self.rng.choice(actions)()

    def kill_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.c.kill(name)
        self.c.worker(name, "-c", "6")
        self.faults["worker kill -9"] += 1

    def freeze_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.c.signal(name, signal.SIGSTOP)
        try:
            self.stop.wait(3.0)  # past the 2 s TTL: its jobs are reclaimed
        finally:
            self.c.signal(name, signal.SIGCONT)
        self.faults["worker SIGSTOP 3s"] += 1

    def kill_scheduler(self) -> None:
        name = self.rng.choice(SCHEDULERS)
        self.c.kill(name)
        self.c.scheduler(name)
        self.faults["scheduler kill -9"] += 1

    def term_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.c.signal(name, signal.SIGTERM)
        self.c.procs[name].wait(timeout=20)
        self.c.worker(name, "-c", "6")
        self.faults["worker SIGTERM"] += 1


def host_keys_seen(c: Cluster, seen: list[bool], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        if next(c.redis.scan_iter(match=c.keys.host("*"), count=1000), None):
            seen.append(True)
            return


@pytest.mark.timeout(170)
def test_soak_random_faults(tmp_path: Path) -> None:
    c = Cluster(tmp_path, {**FAST, "TIDAL_MAX_DELIVERIES": "20", "TIDAL_SHUTDOWN_GRACE_S": "1"})
    book = tmp_path / "ledger"
    nemesis = Nemesis(c)
    watching = threading.Event()
    seen_hosts: list[bool] = []
    try:
        c.api()
        for name in SCHEDULERS:
            c.scheduler(name)
        for name in WORKERS:
            c.worker(name, "-c", "6")
        c.wait_workers(*WORKERS)
        threading.Thread(target=host_keys_seen, args=(c, seen_hosts, watching),
                         daemon=True).start()
        chaos = threading.Thread(target=nemesis.run)
        chaos.start()
        started = monotonic()
        ids: list[str] = []
        specs = [job_spec(i, book) for i in range(JOBS)]
        for i in range(0, JOBS, 100):  # spread over the chaos: faults hit every phase
            ids += c.submit(specs[i:i + 100])
            nemesis.stop.wait(CHAOS_S * 100 / JOBS * 0.9)
        wait_for(lambda: monotonic() - started > CHAOS_S, timeout=CHAOS_S + 30, interval=0.5)
        nemesis.stop.set()
        chaos.join(30)
        healed_at = monotonic()
        states = c.wait_terminal(ids, timeout=60)
        recovery = monotonic() - healed_at
        watching.set()
        check_mirror(c, ids)
        events = c.events()
    finally:
        nemesis.stop.set()
        watching.set()
        c.close()
    ends = terminal_events(events)
    marks = ledger.read(book)
    executions = Counter(m.job for m in marks if m.kind == "start")
    overlaps = ledger.overlaps(marks, longest_ns=int(HOST_JOB_S * 6e9))
    assert len(ids) == JOBS and len(set(ids)) == JOBS
    assert Counter(states.values()) == {"completed": JOBS}, Counter(states.values())
    assert ends == dict.fromkeys(ids, 1)
    assert sum(nemesis.faults.values()) >= 5
    figures("F20 soak", submitted=JOBS, accepted=len(ids), lost=0,
            duplicated=sum(n - 1 for n in ends.values()),
            faults=sum(nemesis.faults.values()), recovery_s=recovery,
            reruns=sum(n - 1 for n in executions.values()), host_overlaps=len(overlaps),
            events=len(events), **{k.replace(" ", "_").replace("-", ""): v
                                     for k, v in nemesis.faults.items()})
    if not seen_hosts:
        pytest.skip("host exclusion not checked: no {prefix}:host: key was ever written (the "
                    "host locks are not in this build); everything else passed")
    assert overlaps == [], explain(overlaps, marks, events)


def explain(overlaps: list[tuple[ledger.Mark, ledger.Mark]], marks: list[ledger.Mark],
            events: list[dict[str, str]]) -> str:
    """The ledger lines and events of the jobs in the first overlaps."""
    jobs = {m.job for pair in overlaps[:3] for m in pair}
    lines = [str(m) for m in marks if m.job in jobs]
    lines += [str(e) for e in events if e["job"] in jobs]
    return "\n".join(lines)


def check_mirror(c: Cluster, ids: list[str]) -> None:
    """The SQL mirror converges to Redis: doctor finds nothing, and every job has exactly
    one terminal event row."""
    engine = make_engine(c.settings)
    try:
        doctor = Doctor(c.redis, c.keys, c.settings, engine)
        wait_for(lambda: not [f for f in doctor.examine() if f.check not in
                              ("dead_consumer", "registry_orphan")], timeout=40, interval=0.5,
                 what="the mirror to converge")
        with Session(engine) as s:
            ended = dict(s.exec(select(EventRecord.job_id, func.count()).where(
                col(EventRecord.state).in_(TERMINAL)).group_by(EventRecord.job_id)).all())
            rows = int(s.exec(select(func.count()).select_from(JobRecord)).one())
    finally:
        engine.dispose()
    assert ended == dict.fromkeys(ids, 1)
    assert rows == len(ids)
