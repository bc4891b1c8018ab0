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
from common.keys import Keys
from common.settings import Settings
from common.valkey import free_port
from tests.support import wait_for

ADMIN = {"Authorization": "Bearer admintoken"}
RUN = "from api.main import run; from common.settings import Settings; run(Settings())"


@pytest.fixture
def server(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "TIDAL_REDIS_URL": settings.redis_url,
        "TIDAL_PREFIX": settings.prefix,
        "TIDAL_DATA_DIR": str(settings.data_dir),
        "TIDAL_TOKEN": "admintoken",
        "TIDAL_API_PORT": str(port),
        "TIDAL_LOG_FORMAT": "json",
    }
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", RUN], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, timeout=20, what="the API to answer /healthz")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


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
