"""docker-compose.yml's service commands, run as local processes against a local server
(no Docker engine runs here): proves the commands and environment it ships work."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import yaml

from common.client import Client
from common.valkey import free_port
from tests.e2e.conftest import REPO, Procs, clean_env, tidal_cmd
from tests.support import wait_for

pytestmark = pytest.mark.slow


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_dockerfile_entrypoint_is_the_tidal_cli() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tidal"]' in text
    for part in ("api", "scheduler", "worker", "cli", "common"):
        assert f"COPY {part} ./{part}" in text


def test_compose_services_run_as_local_processes(
    tmp_path: Path, valkey_url: str, prefix: str, procs: Procs
) -> None:
    services = compose()["services"]
    assert {"redis", "api", "scheduler", "worker"} <= set(services)
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    port = free_port()
    token = "compose-admin-token"
    started = {}
    for name in ("api", "scheduler", "worker"):
        svc = services[name]
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert env["TIDAL_REDIS_URL"].startswith("redis://redis:")
        env.update(TIDAL_REDIS_URL=valkey_url, TIDAL_TOKEN=token, TIDAL_PREFIX=prefix,
                   TIDAL_DATA_DIR=str(tmp_path / "data"))
        command = [str(c) for c in svc["command"]]
        if "--port" in command:
            command[command.index("--port") + 1] = str(port)
            command[command.index("--host") + 1] = "127.0.0.1"
        started[name] = procs.start(tidal_cmd(*command), cwd=tmp_path,
                                    env=clean_env(tmp_path, **env), log=tmp_path / f"{name}.log")

    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=30, what="the api to answer /healthz")
    with Client(url, token) as client:
        job = client.submit({"command": ["sh", "-c", "echo from-compose"]})
        done = client.wait(job.id, timeout=30)
        assert done.state == "completed" and done.exit_code == 0
        lines = [line.text for line in client.logs(job.id).lines]
        assert lines == ["from-compose"]
        wait_for(lambda: any(j.id == job.id for j in client.list().jobs), timeout=10,
                 what="the job in the SQL mirror")

    for name in ("worker", "scheduler", "api"):
        started[name].send_signal(signal.SIGTERM)
        assert started[name].wait(timeout=45) == 0, (tmp_path / f"{name}.log").read_text()
