"""Fixtures of the integration ring."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from common.settings import Settings

ADMIN_TOKEN = "admintoken"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client(settings: Settings, r: redis.Redis) -> Iterator[TestClient]:
    """The API app in-process (TestClient) on this test's key prefix, as the admin."""
    app = create_app(settings.model_copy(update={"token": ADMIN_TOKEN}))
    with TestClient(app, headers=ADMIN) as c:
        yield c
