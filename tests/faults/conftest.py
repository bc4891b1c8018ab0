"""The fault-injection ring (RELIABILITY.md §5): Tidal's services as real processes
(`python -m cli api|scheduler|worker`), each test on its own Redis (valkey-server with the
configuration `tidal up` ships: AOF, fsync every second). Faults are injected by PID,
never by name; everything started is stopped in `finally`. Each test prints one line of
figures, repeated in the terminal summary."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from common.keys import Keys
from common.procs import die_with_parent
from common.redis import connect
from common.settings import Settings
from common.valkey import free_port, start_server
from tests.e2e.conftest import clean_env, tidal_cmd
from tests.support import wait_for
from worker.cgroup import own_pids_cgroup, pids_mount, sweep

ADMIN = "fault-admin-token"
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
# detection in seconds instead of tens of seconds (F1 also runs once with the defaults)
FAST = {
    "TIDAL_HEARTBEAT_S": "0.5",
    "TIDAL_WORKER_TTL_S": "2",
    "TIDAL_REAP_INTERVAL_S": "0.5",
    "TIDAL_RECLAIM_IDLE_S": "2",
    "TIDAL_KILL_GRACE_S": "0.5",
}
FIGURES: list[str] = []


class Cluster:
    """One test's services. `start` names each process; faults address it by that name."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_dir = tmp / "redis"
        self.redis_proc, self.redis_url = start_server(self.redis_dir, aof=True)
        self.redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self.env = clean_env(tmp, TIDAL_REDIS_URL=self.redis_url, TIDAL_TOKEN=ADMIN,
                             TIDAL_DATA_DIR=str(tmp / "data"), **env)
        self.settings = Settings(redis_url=self.redis_url, data_dir=tmp / "data")
        self.keys = Keys(self.settings.prefix)
        self.redis = connect(self.redis_url, timeout=5.0)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.api_url = ""
        self._http: httpx.Client | None = None

    # -- processes ---------------------------------------------------------------------

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(tidal_cmd(*args), cwd=self.tmp, env={**self.env, **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent())
        self.procs[name] = proc
        return proc

    def api(self) -> str:
        """Start the API; the first request waits until it answers (so the other
        services start meanwhile)."""
        port = free_port()
        self.start("api", "api", "--port", str(port))
        self.api_url = f"http://127.0.0.1:{port}"
        return self.api_url

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.api_url, timeout=10.0,
                                      headers={"Authorization": f"Bearer {ADMIN}"})
            wait_for(self._healthy, timeout=30, interval=0.1, what="the API")
        return self._http

    def _healthy(self) -> bool:
        assert self._http is not None
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def scheduler(self, name: str = "s1", **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, "scheduler", env=env)

    def worker(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--allow-module", "tests.faults.jobs", *args, env=env)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def kill(self, name: str) -> None:
        """kill -9 by PID, and reap it (so its pid is free and it counts as dead)."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def worker_id(self, name: str) -> str:
        """The id a worker process registered under (its pid is part of it)."""
        pid = f"-{self.pid(name)}-"
        return wait_for(lambda: next((w for w in self.redis.zrange(self.keys.workers(), 0, -1)
                                      if pid in w), None), timeout=30, what=f"{name} to register")

    def wait_workers(self, *names: str) -> None:
        for name in names:
            self.worker_id(name)

    # -- Redis -------------------------------------------------------------------------

    def kill_redis(self) -> None:
        os.kill(self.redis_proc.pid, signal.SIGKILL)
        self.redis_proc.wait(timeout=10)

    def restart_redis(self) -> None:
        """Start the server again on the same port and files (AOF is replayed)."""
        self.redis_proc, _ = start_server(self.redis_dir, port=self.redis_port, aof=True)

    def states(self, ids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "state")
        return dict(zip(ids, pipe.execute(), strict=True))

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, str | None]:
        def done() -> dict[str, str | None] | None:
            states = self.states(ids)
            return states if all(s in TERMINAL for s in states.values()) else None

        left = wait_for(done, timeout=timeout, interval=0.2,
                        what=f"{len(ids)} jobs to end") if ids else {}
        return left

    def events(self) -> list[dict[str, str]]:
        return [f for _, f in self.redis.xrange(self.keys.events())]

    def submit(self, specs: list[dict[str, Any]]) -> list[str]:
        answer = self.http.post("/jobs", json=specs)
        assert answer.status_code == 202, answer.text
        return [j["id"] for j in answer.json()["jobs"]]

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """SIGCONT (a stopped process ignores SIGTERM) and SIGTERM to every process at
        once, SIGKILL to what is left after 20 s, job processes included; Redis last."""
        live = [p for p in self.procs.values() if p.poll() is None]
        trees = {p.pid: _tree(p.pid) for p in live}
        for proc in live:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
        deadline = time.monotonic() + 20
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for child in trees[proc.pid]:
                try:
                    child.kill()
                except psutil.Error:
                    pass
        if self._http is not None:
            self._http.close()
        self.redis.close()
        _sweep_job_cgroups()
        if self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _sweep_job_cgroups() -> None:
    """Kill what killed workers left in their job cgroups (the workers' default root)."""
    mount = pids_mount()
    if mount is not None:
        root = mount / own_pids_cgroup().lstrip("/") / "tidal"
        if root.is_dir():
            sweep(root, keep="")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, FAST)
    try:
        yield c
    finally:
        c.close()


def figures(name: str, **values: Any) -> str:
    """Print one line of figures (and keep it for the terminal summary)."""
    parts = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())
    line = f"{name}: {parts}"
    print(line, flush=True)
    FIGURES.append(line)
    return line


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the tail of every service log of the test (its processes'
    own account is what tells a slow start from a refused lease or a crashed runner)."""
    outcome = yield
    report = outcome.get_result()
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and tmp is not None and (tmp / "logs").is_dir():
        for log in sorted((tmp / "logs").glob("*.log")):
            tail = log.read_bytes()[-6000:].decode("utf-8", "replace")
            report.sections.append((f"service log {log.name} (tail)", tail))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def terminal_events(events: list[dict[str, str]]) -> dict[str, int]:
    """How many terminal events each job has in the events stream."""
    counts: dict[str, int] = {}
    for e in events:
        if e["state"] in TERMINAL:
            counts[e["job"]] = counts.get(e["job"], 0) + 1
    return counts


def monotonic() -> float:
    return time.monotonic()
