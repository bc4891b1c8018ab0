"""One pids cgroup per attempt: bounds a fork bomb and finds every process of a job.

RLIMIT_NPROC does nothing for root and counts every process of the uid, the worker's
included (RELIABILITY.md finding 9); a pids cgroup bounds the job alone. Only the cgroup v1
`pids` hierarchy is used: there a single thread may change cgroup (its TID written to
`tasks`) and a child is born in the cgroup of the thread that forked it. So the runner
thread steps into the job's cgroup, spawns the job, and steps back, which needs neither
`preexec_fn` (unsafe in a threaded worker: finding 10) nor a wrapper process. Where no
writable v1 pids hierarchy exists (not root, cgroup v2 only) jobs run without one and the
worker says so once at start-up.

Layout: `<root>/<worker id>/<job id>-<attempt>`, where root defaults to
`<pids mount>/<the worker's own pids cgroup>/tidal`, so limits on the worker's cgroup
also bound its jobs. Directories of workers that are gone are removed at start-up.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.logging import get_logger

log = get_logger("tidal.worker.cgroup")

KILL_ROUNDS = 50  # SIGKILL passes over cgroup.procs while a fork bomb still forks
REMOVE_TRIES = 20


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def pids_mount() -> Path | None:
    """Where the cgroup v1 `pids` hierarchy is mounted, if it is."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and "pids" in parts[3].split(","):
            return Path(parts[1])
    return None


def own_pids_cgroup() -> str:
    """This process's path in the pids hierarchy ('/' when at the top)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return path
    return "/"


@dataclass(frozen=True)
class JobCgroup:
    path: Path
    home: Path  # the worker's own cgroup, where the runner thread goes back to
    pids_max: int = 0

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block (a spawn) with the calling thread inside this cgroup; if the
        thread cannot move, the block runs where it is (logged)."""
        tid = str(threading.get_native_id())
        try:
            _write(self.path / "tasks", tid)
        except OSError as exc:
            log.warning("cannot enter the job cgroup", path=str(self.path), error=str(exc))
            yield
            return
        try:
            yield
        finally:
            try:
                _write(self.home / "tasks", tid)
            except OSError as exc:
                log.error("cannot leave the job cgroup", path=str(self.path), error=str(exc))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def limit_hits(self) -> int:
        """How often a fork in this cgroup failed at pids.max."""
        try:
            text = (self.path / "pids.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, count = line.partition(" ")
            if name == "max":
                return int(count)
        return 0

    def kill(self) -> bool:
        """SIGKILL every process in the cgroup, again while a fork bomb still forks;
        True when it is empty."""
        for _ in range(KILL_ROUNDS):
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    continue
            time.sleep(0.005)
        return not self.pids()

    def remove(self) -> None:
        """Kill what is left and remove the directory (killed tasks leave it at once)."""
        self.kill()
        for _ in range(REMOVE_TRIES):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                self.kill()
                time.sleep(0.05)
        log.warning("cannot remove a job cgroup", path=str(self.path))


@dataclass(frozen=True)
class Cgroups:
    """The per-attempt cgroups of one worker."""

    base: Path  # <root>/<worker id>
    home: Path
    pids_max: int

    @classmethod
    def create(cls, worker_id: str, pids_max: int, root: Path | None = None) -> Cgroups | None:
        """Set up `<root>/<worker id>`; None (and why, logged) when cgroups can't be used."""
        if pids_max <= 0:
            return None
        mount = pids_mount()
        if mount is None:
            log.warning("no cgroup v1 pids hierarchy: jobs run without a process limit")
            return None
        home = mount / own_pids_cgroup().lstrip("/")
        root = root or home / "tidal"
        base = root / worker_id
        try:
            base.mkdir(parents=True, exist_ok=True)
            _write(base / "pids.max", "max")
        except OSError as exc:
            log.warning("cannot create job cgroups: jobs run without a process limit",
                        path=str(base), error=str(exc))
            return None
        cgroups = cls(base, home, pids_max)
        cgroups.sweep()
        return cgroups

    def sweep(self) -> None:
        """Kill the leftovers of workers of this machine that died (kill -9): their
        attempts are given to other workers, so their processes must not run on."""
        sweep(self.base.parent, keep=self.base.name)

    def job(self, name: str) -> JobCgroup | None:
        """A fresh cgroup for one attempt, or None if it cannot be made."""
        path = self.base / name
        try:
            path.mkdir(exist_ok=True)
            _write(path / "pids.max", str(self.pids_max))
        except OSError as exc:
            log.warning("cannot create a job cgroup", path=str(path), error=str(exc))
            return None
        return JobCgroup(path, self.home, self.pids_max)

    def close(self) -> None:
        for child in _subdirs(self.base):
            JobCgroup(child, self.home).remove()
        try:
            self.base.rmdir()
        except OSError:
            pass


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def _worker_pid(worker_id: str) -> int | None:
    """The pid in a worker id `<hostname>-<pid>-<hex>` of a worker of this host (another
    host's pids mean nothing here)."""
    parts = worker_id.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    return int(parts[1])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sweep(root: Path, keep: str) -> None:
    """Remove the cgroups that workers of this machine left behind when they died."""
    for worker_dir in _subdirs(root):
        pid = _worker_pid(worker_dir.name)
        if worker_dir.name == keep or pid is None or _alive(pid):
            continue
        for job_dir in _subdirs(worker_dir):
            JobCgroup(job_dir, root).remove()
        try:
            worker_dir.rmdir()
        except OSError:
            pass
