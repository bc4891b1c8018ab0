"""`api.main.run` as a real uvicorn process: it serves, streams SSE over a socket, writes
structured logs, and SIGTERM stops it even while a log follower is connected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from api.main import SHUTDOWN_GRACE_S
from common.client import Client
from common.errors import JobNotFound, TidalError
from common.jobs import new_job_id
from common.keys import Keys
from common.settings import Settings
from common.valkey import free_port
from tests.support import wait_for

ADMIN = {"Authorization": "Bearer admintoken"}
RUN = "from api.main import run; from common.settings import Settings; run(Settings())"


def spawn_api(settings: Settings, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`api.main.run` in a process of its own on `port`, logging to `log_path` (appended)."""
    env = {
        **os.environ,
        "TIDAL_REDIS_URL": settings.redis_url,
        "TIDAL_PREFIX": settings.prefix,
        "TIDAL_DATA_DIR": str(settings.data_dir),
        "TIDAL_TOKEN": "admintoken",
        "TIDAL_API_PORT": str(port),
        "TIDAL_LOG_FORMAT": "json",
        "TIDAL_ADMIT_DIRECT": str(settings.admit_direct).lower(),
    }
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-c", RUN], env=env, stdout=log, stderr=log)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=20, what="the API to answer /healthz")


@pytest.fixture
def server(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log_path = tmp_path / "api.log"
    proc = spawn_api(settings, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serves_follows_and_stops_on_sigterm(
    server: tuple[str, subprocess.Popen[bytes]], r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    url, proc = server
    with httpx.Client(base_url=url, headers=ADMIN, timeout=10) as http:
        job = http.post("/jobs", json={"command": ["make"]}).json()
        entry = r.xadd(keys.log(job["id"]), {"s": "o", "t": 1, "l": "over the wire"})
        with http.stream("GET", f"/jobs/{job['id']}/logs", params={"follow": "true"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            assert next(lines) == f"id: {entry}"
            assert next(lines) == "event: line"
            assert orjson.loads(next(lines).removeprefix("data: "))["text"] == "over the wire"
            # the job is still pending: the follower is connected when the server stops
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert [ln for ln in lines if ln] == []  # closed without `end`: resume later
            # uvicorn re-raises the signal once it has shut down
            assert proc.wait(timeout=SHUTDOWN_GRACE_S + 5) in (0, -signal.SIGTERM)
            assert time.monotonic() - t0 < SHUTDOWN_GRACE_S / 2  # followers did not hold it
    log = (tmp_path / "api.log").read_text()
    events = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    submitted = [e for e in events if e.get("event") == "jobs_submitted"]
    assert submitted and submitted[0]["service"] == "api" and submitted[0]["request_id"]
    assert any(e.get("event") == "request" and e.get("status") == 202 for e in events)
    assert events[-1]["event"] == "api_stopped"  # the lifespan closed its clients
    assert "Traceback" not in log


def test_docs_page_and_its_assets_are_served_without_a_cdn(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """/docs works on a machine without internet: Swagger UI comes from this server."""
    url, _ = server
    page = httpx.get(f"{url}/docs", timeout=10)
    assert page.status_code == 200
    assert "cdn." not in page.text and "://" not in page.text.replace(url, "")
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page.text
        got = httpx.get(f"{url}{asset}", timeout=10)
        assert got.status_code == 200 and len(got.content) > 10_000
    assert httpx.get(f"{url}/openapi.json", timeout=10).json()["info"]["title"] == "Tidal"


def test_the_sdk_over_a_real_socket_keeps_working_across_an_api_restart(
    server: tuple[str, subprocess.Popen[bytes]], settings: Settings, tmp_path: Path,
    r: redis.Redis, keys: Keys,
) -> None:
    """The SDK's JSON calls go over one keep-alive connection (common/http.py): errors map
    as over httpx, a connection the server closed is replaced before it is used (no error,
    nothing sent twice), and a server that is gone is reported as unreachable."""
    url, proc = server
    with Client(url, "admintoken", timeout=10) as client:
        job = client.submit({"command": ["true"]})
        assert client.get(job.id).state == "pending"
        assert client.health().status
        with pytest.raises(JobNotFound):
            client.get(new_job_id())
        proc.send_signal(signal.SIGTERM)  # closes the client's idle connection
        proc.wait(timeout=SHUTDOWN_GRACE_S + 5)
        log_path = tmp_path / "api-again.log"
        again = spawn_api(settings, int(url.rsplit(":", 1)[1]), log_path)
        try:
            wait_healthy(url, again, log_path)
            second = client.submit({"command": ["true"]})
            assert second.id != job.id
            submitted = [f["id"] for _, f in r.xrange(keys.submissions())]
            assert submitted == [job.id, second.id]  # each sent once
        finally:
            again.send_signal(signal.SIGTERM)
            again.wait(timeout=SHUTDOWN_GRACE_S + 5)
        with pytest.raises(TidalError, match="cannot reach the Tidal API"):
            client.get(job.id)
