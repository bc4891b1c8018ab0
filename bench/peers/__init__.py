"""The peers: each Redis job queue in its own throw-away virtualenv under the system temp
dir (pinned like /work/shared/PERFORMANCE.md; the latest release when a pin is not on the
index), run on its own database number of the run's Valkey (FLUSHDB between runs), with
the tiny scripts beside this file (`<peer>_peer.py enqueue|worker|latency`).

BullMQ is the one Node peer (`runtime="node"`): an npm install in the same kind of
throw-away dir, driven by `bullmq_peer.mjs` with the same command line and outputs; it runs
only where `node` and `npm` are on PATH (`NodePeer`).

A peer's no-op task bumps an in-process counter that a thread reports to Redis every
20 ms (`_common.py`), so the drain rate is (N − 1) / (last − first job executed) on the
workers' own clock: start-up is outside the window, as for Tidal."""

from __future__ import annotations

import json
import os
import shutil
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
    runtime: str = "python"  # or "node": npm packages, driven by bench/peers/<name>_peer.mjs
    extra: tuple[str, ...] = ()  # further npm packages, pinned (node peers)


PEERS: dict[str, PeerSpec] = {
    "dramatiq": PeerSpec("dramatiq", "dramatiq[redis]==2.2.1", "dramatiq[redis]", (8, 16),
                         False, 1, "worker_threads"),
    "arq": PeerSpec("arq", "arq==0.28.0", "arq", (50, 200), False, 2, "max_jobs"),
    "celery": PeerSpec("celery", "celery[redis]==5.7.0", "celery[redis]", (1, 8), False, 3,
                       "1 = solo pool, else threads pool"),
    "rq": PeerSpec("rq", "rq==3.0.0", "rq", (1,), True, 4, "SimpleWorker"),
    # 50 jobs in flight is where PERFORMANCE.md measured its best drain (7,487 jobs/s, ioredis
    # coalescing the commands of many jobs per socket read); 200 checks that more does not
    # help here. ioredis is an optional peer dependency of BullMQ 6: pinned to the version
    # BullMQ 6.7.0 is developed against (its devDependencies).
    "bullmq": PeerSpec("bullmq", "bullmq@6.7.0", "bullmq", (50, 200), True, 5,
                       "Worker concurrency", runtime="node", extra=("ioredis@5.11.1",)),
}


def missing_runtime(spec: PeerSpec) -> str | None:
    """Why this peer cannot run on this machine, or None."""
    if spec.runtime == "node":
        absent = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
        if absent:
            return f"{' and '.join(absent)} not on PATH"
    return None


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

    def _call_env(self) -> dict[str, str] | None:
        return None  # the harness's own environment

    def _worker_env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}

    def extra_versions(self) -> dict[str, str]:
        """Versions of what else the peer runs on, for the results' `versions`."""
        return {}

    def call(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        out = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout,
                             cwd=HERE, env=self._call_env())
        if out.returncode != 0:
            raise RuntimeError(f"{self.spec.name} {args[0]} failed: {out.stderr[-1500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start_worker(self, concurrency: int, latency: bool = False) -> subprocess.Popen[Any]:
        argv = self._cmd("worker", "--concurrency", str(concurrency),
                         *(["--latency"] if latency else []))
        logfile = VENVS / f"{self.spec.name}-worker.log"
        proc = self.services.spawn(argv, self._worker_env(), logfile, cwd=HERE)
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


class NodePeer(Peer):
    """A peer on Node (BullMQ): `npm install` into VENVS/<name> (reused after), run with the
    `node` on PATH and NODE_PATH pointing at that install. A worker is one `node` process
    (no children: its CPU, all threads included, is that pid's), measured as the others."""

    @property
    def dir(self) -> Path:
        return VENVS / self.spec.name

    @property
    def modules(self) -> Path:
        return self.dir / "node_modules"

    @property
    def script(self) -> Path:
        return HERE / f"{self.spec.name}_peer.mjs"

    @staticmethod
    def _package(requirement: str) -> str:
        """npm package name of `name@version` (a leading @ is a scope, not a version)."""
        at = requirement.rfind("@")
        return requirement[:at] if at > 0 else requirement

    def _installed(self, requirement: str) -> str | None:
        meta = self.modules / self._package(requirement) / "package.json"
        return str(json.loads(meta.read_text())["version"]) if meta.exists() else None

    def ensure(self) -> str:
        """npm-install the packages if needed; returns the installed version."""
        wanted = (self.spec.requirement, *self.spec.extra)
        if not all(self._installed(r) for r in wanted):
            log(f"installing {' '.join(wanted)} into {self.dir}")
            self.dir.mkdir(parents=True, exist_ok=True)
            # its own package.json, so npm installs here and not into a parent project
            pkg = self.dir / "package.json"
            if not pkg.exists():
                pkg.write_text(json.dumps({"name": f"tidal-bench-{self.spec.name}",
                                           "private": True}))
            npm = ["npm", "install", "--no-audit", "--no-fund", "--save-exact",
                   "--prefix", str(self.dir)]
            done = subprocess.run([*npm, *wanted], capture_output=True, cwd=self.dir)
            if done.returncode != 0:
                log(f"{' '.join(wanted)} not installable; taking the latest releases")
                subprocess.run([*npm, *map(self._package, wanted)], check=True,
                               capture_output=True, cwd=self.dir)
        version = self._installed(self.spec.requirement)
        if version is None:
            raise RuntimeError(f"{self.spec.requirement} is not in {self.modules}")
        return version

    def extra_versions(self) -> dict[str, str]:
        node = subprocess.run([self._node(), "--version"], capture_output=True, text=True)
        out = {"node": node.stdout.strip().lstrip("v")}
        for requirement in self.spec.extra:
            out[self._package(requirement)] = self._installed(requirement) or "-"
        return out

    @staticmethod
    def _node() -> str:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node not on PATH")
        return node

    def _cmd(self, *args: str) -> list[str]:
        return [self._node(), str(self.script), *args, "--url", self.url]

    def _call_env(self) -> dict[str, str]:
        return {**os.environ, "NODE_PATH": str(self.modules)}

    def _worker_env(self) -> dict[str, str]:
        path = dict.fromkeys([str(Path(self._node()).parent), "/usr/bin", "/bin"])
        return {"PATH": ":".join(path), "NODE_PATH": str(self.modules)}


def make(spec: PeerSpec, valkey: Valkey, services: Services) -> Peer:
    return (NodePeer if spec.runtime == "node" else Peer)(spec, valkey, services)
