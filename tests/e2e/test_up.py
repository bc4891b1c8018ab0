"""`tidal up` as a process, driven with the CLI from another "terminal", as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from common.valkey import free_port
from tests.e2e.conftest import Procs, clean_env, tidal_cmd
from tests.support import wait_for

pytestmark = pytest.mark.slow


def cli(tmp: Path, *args: str, token: str | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = clean_env(tmp)
    if token:
        env["TIDAL_TOKEN"] = token
    return subprocess.run(tidal_cmd(*args), cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


def status(tmp: Path, job_id: str) -> dict:  # type: ignore[type-arg]
    out = cli(tmp, "status", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tidal_up_end_to_end(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    up = procs.start(
        tidal_cmd("up", "--port", str(port), "--data-dir", str(tmp_path / ".tidal"),
                  "--workers", "1", "--concurrency", "2"),
        cwd=tmp_path, env=clean_env(tmp_path), log=tmp_path / "up.log",
    )
    log = tmp_path / "up.log"
    cfg = tmp_path / ".tidal" / "cli.json"
    wait_for(lambda: cfg.exists() and "url" in cfg.read_text(), timeout=60,
             what="tidal up to write cli.json")
    assert (tmp_path / "xdg" / "tidal" / "cli.json").exists()
    assert f"http://127.0.0.1:{port}" in log.read_text()

    # the dashboard: `tidal dashboard` gives its address signed in; the page is served
    out = cli(tmp_path, "dashboard", "--no-open")
    assert out.returncode == 0, out.stderr
    page, _, fragment = out.stdout.strip().partition("#token=")
    assert page == f"http://127.0.0.1:{port}/" and fragment.startswith("tdl_")
    with urllib.request.urlopen(page, timeout=10) as resp:
        assert resp.status == 200 and "<title>Tidal</title>" in resp.read().decode()

    # the example: both streams as they happen, and the job's exit code
    out = cli(tmp_path, "submit", "--follow", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3")
    assert out.returncode == 3, out.stderr
    assert "hello" in out.stdout and "oops" not in out.stdout
    assert "oops" in out.stderr

    # submit prints only the id; status / logs / list see it
    out = cli(tmp_path, "submit", "--priority", "high", "--", "echo", "hi there")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert len(job_id) == 26
    wait_for(lambda: status(tmp_path, job_id)["state"] == "completed", timeout=30,
             what="the job to complete")
    assert status(tmp_path, job_id)["priority"] == "high"
    logs = cli(tmp_path, "logs", job_id)
    assert "hi there" in logs.stdout
    wait_for(lambda: job_id in cli(tmp_path, "list", "--json").stdout, timeout=15,
             what="the job in `tidal list`")
    assert job_id in cli(tmp_path, "list").stdout  # the table too

    # cancel a running job: its whole process tree goes
    out = cli(tmp_path, "submit", "--", "sh", "-c", "sleep 300 & sleep 300; wait")
    long_id = out.stdout.strip()
    wait_for(lambda: status(tmp_path, long_id)["state"] == "running", timeout=30, what="running")
    assert cli(tmp_path, "cancel", long_id).returncode == 0
    wait_for(lambda: status(tmp_path, long_id)["state"] == "cancelled", timeout=30,
             what="cancelled")
    # SIGKILL went to the whole tree before the state was written; the kernel ends the
    # processes as they are next scheduled (moments later on a busy machine)
    wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                          if p.info["cmdline"] == ["sleep", "300"]],
             timeout=5, what="the job's whole process tree to be gone")

    # workers, with a readable table and JSON
    workers = json.loads(cli(tmp_path, "workers", "--json").stdout)
    assert len(workers) == 1 and workers[0]["slots"] == 2

    # users: a new user's token sees only their own jobs
    out = cli(tmp_path, "token", "create", "--user", "bob")
    assert out.returncode == 0, out.stderr
    bob = out.stdout.strip().split()[-1]
    assert cli(tmp_path, "status", job_id, token=bob).returncode == 1
    mine = cli(tmp_path, "submit", "--", "true", token=bob).stdout.strip()
    assert len(mine) == 26
    assert cli(tmp_path, "status", mine, token=bob).returncode == 0
    assert cli(tmp_path, "status", job_id, token="wrong").returncode == 1

    # its Redis fsyncs before it acknowledges (docs/reliability.md: why always)
    [server] = [p for p in psutil.Process(up.pid).children(recursive=True)
                if "valkey-server" in p.name()]
    [port] = {c.laddr.port for c in server.net_connections("tcp") if c.status == "LISTEN"}
    with redis.Redis(port=port) as r:
        assert r.config_get("appendfsync") == {"appendfsync": "always"}

    # a worker that dies is restarted, and `tidal up` says so
    [worker] = [p for p in psutil.Process(up.pid).children() if "worker" in p.cmdline()]
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: "restart" in log.read_text(), timeout=30, what="a restart notice")
    wait_for(lambda: any(p.pid != worker.pid and "worker" in p.cmdline()
                         for p in psutil.Process(up.pid).children()), timeout=30,
             what="a new worker process")

    # Ctrl-C stops everything cleanly
    children = psutil.Process(up.pid).children(recursive=True)
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=60) == 0, log.read_text()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_no_service_outlives_tidal_up(tmp_path: Path, procs: Procs, sig: signal.Signals) -> None:
    """The terminal closing (SIGHUP) stops everything cleanly; even a SIGKILLed `tidal up`
    takes its services with it (they get SIGTERM when their parent dies)."""
    up = procs.start(
        tidal_cmd("up", "--port", str(free_port()), "--data-dir", str(tmp_path / ".tidal"),
                  "--workers", "1"),
        cwd=tmp_path, env=clean_env(tmp_path), log=tmp_path / "up.log",
    )
    cfg = tmp_path / ".tidal" / "cli.json"
    wait_for(lambda: cfg.exists() and "url" in cfg.read_text(), timeout=60, what="cli.json")
    children = psutil.Process(up.pid).children(recursive=True)
    assert len(children) >= 4  # redis, api, scheduler, worker
    up.send_signal(sig)
    code = up.wait(timeout=60)
    assert code == (0 if sig == signal.SIGHUP else -signal.SIGKILL)
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
