"""The peers: each Redis job queue in its own throw-away virtualenv under the system temp
dir (pinned like /work/shared/PERFORMANCE.md; the latest release when a pin is not on the
index), run on its own database number of the run's Valkey (FLUSHDB between runs), with
the tiny scripts beside this file (`<peer>_peer.py enqueue|worker|latency`).

A peer's no-op task bumps an in-process counter that a thread reports to Redis every
20 ms (`_common.py`), so the drain rate is (N − 1) / (last − first job executed) on the
workers' own clock: start-up is outside the window, as for Tidal."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.env import Services, Valkey, log, per_job

HERE = Path(__file__).resolve().parent
VENVS = Path(tempfile.gettempdir()) / "tidal-bench-peers"


@dataclass(frozen=True)
class PeerSpec:
    name: str
    requirement: str  # pinned
    fallback: str  # unpinned, when the pin is not on the index
    configs: tuple[int, ...]  # concurrencies tried for the drain (best one reported)
    bulk: bool  # has a bulk enqueue
    db: int
    notes: str = ""


PEERS: dict[str, PeerSpec] = {
    "dramatiq": PeerSpec("dramatiq", "dramatiq[redis]==2.2.1", "dramatiq[redis]", (8, 16),
                         False, 1, "worker_threads"),
    "arq": PeerSpec("arq", "arq==0.28.0", "arq", (50, 200), False, 2, "max_jobs"),
    "celery": PeerSpec("celery", "celery[redis]==5.7.0", "celery[redis]", (1, 8), False, 3,
                       "1 = solo pool, else threads pool"),
    "rq": PeerSpec("rq", "rq==3.0.0", "rq", (1,), True, 4, "SimpleWorker"),
}


@dataclass
class Peer:
    spec: PeerSpec
    valkey: Valkey
    services: Services
    workers: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return VENVS / self.spec.name / "bin" / "python"

    @property
    def url(self) -> str:
        return self.valkey.url_db(self.spec.db)

    @property
    def script(self) -> Path:
        return HERE / f"{self.spec.name}_peer.py"

    # -- install ------------------------------------------------------------------------------
    def ensure(self) -> str:
        """Create the virtualenv if needed; returns the installed version."""
        venv = VENVS / self.spec.name
        if not self.python.exists():
            log(f"installing {self.spec.requirement} into {venv}")
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip = [str(self.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            extra = ["redis[hiredis]", "psutil"]
            done = subprocess.run([*pip, self.spec.requirement, *extra], capture_output=True)
            if done.returncode != 0:
                log(f"{self.spec.requirement} not installable; taking the latest release")
                subprocess.run([*pip, self.spec.fallback, *extra], check=True,
                               capture_output=True)
        dist = self.spec.requirement.split("[")[0].split("=")[0]
        out = subprocess.run([str(self.python), "-c",
                              f"from importlib.metadata import version as v; print(v('{dist}'))"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    # -- processes -------------------------------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        return [str(self.python), str(self.script), *args, "--url", self.url]

    def call(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        out = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout,
                             cwd=HERE)
        if out.returncode != 0:
            raise RuntimeError(f"{self.spec.name} {args[0]} failed: {out.stderr[-1500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start_worker(self, concurrency: int, latency: bool = False) -> subprocess.Popen[Any]:
        argv = self._cmd("worker", "--concurrency", str(concurrency),
                         *(["--latency"] if latency else []))
        logfile = VENVS / f"{self.spec.name}-worker.log"
        proc = self.services.spawn(argv, {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
                                   logfile, cwd=HERE)
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            self.services.stop(proc, grace=10.0)
        self.workers.clear()

    def flush(self) -> None:
        self.valkey.connect(self.spec.db).execute_command("FLUSHDB", "SYNC")

    def counts(self) -> tuple[int, float, float]:
        raw = self.valkey.connect(self.spec.db).hgetall("bench:done")
        n, first, last = 0, float("inf"), 0.0
        for value in raw.values():
            c, f, la = value.split()
            if int(c):
                n += int(c)
                first, last = min(first, float(f)), max(last, float(la))
        return n, first, last

    # -- workloads ---------------------------------------------------------------------------
    def submit(self, n: int, bulk: bool) -> dict[str, Any]:
        self.flush()
        before = self.valkey.snapshot()
        got = self.call("enqueue", "--n", str(n), *(["--bulk"] if bulk else []))
        after = self.valkey.snapshot()
        out = {"jobs": n, "jobs_per_s": round(n / got["seconds"], 1)}
        out.update(per_job(before, after, n))
        out.pop("server_cpu_ms_per_job", None)
        return out

    def drain(self, n: int, concurrency: int, processes: int = 1,
              timeout: float = 120) -> dict[str, Any]:
        self.flush()
        self.call("enqueue", "--n", str(n), *(["--bulk"] if self.spec.bulk else []))
        procs = [self.start_worker(concurrency) for _ in range(processes)]
        deadline = time.monotonic() + 60
        while self.counts()[0] < 1:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{self.spec.name} worker exited; see {VENVS}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: no job ran in 60 s")
            time.sleep(0.005)
        start_count = self.counts()[0]
        pids = {"worker": [p.pid for p in procs]}
        before = self.valkey.snapshot(pids)
        deadline = time.monotonic() + timeout
        while self.counts()[0] < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)  # one more report
        done, first, last = self.counts()
        after = self.valkey.snapshot(pids)
        self.stop_workers()
        out: dict[str, Any] = {
            "jobs": n, "done": done, "concurrency": concurrency, "processes": processes,
            "jobs_per_s": round((done - 1) / max(1e-3, last - first), 1),
            "partial": done < n,
        }
        out.update(per_job(before, after, max(1, done - start_count)))
        return out

    def latency(self, n: int) -> list[float]:
        self.flush()
        self.start_worker(1 if self.spec.name in ("celery", "rq") else 8, latency=True)
        try:
            return list(self.call("latency", "--n", str(n), timeout=600)["samples_ms"])
        finally:
            self.stop_workers()
