"""Consumer-group set-up, done the safe way (RELIABILITY.md finding 3): groups are created
at id 0 with MKSTREAM, so a backlog written before the group existed is still delivered."""

from __future__ import annotations

from typing import Any

import redis


def ensure_group(client: Any, stream: str, group: str) -> None:
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_group_async(client: Any, stream: str, group: str) -> None:
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
