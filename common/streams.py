"""Consumer-group set-up, done the safe way (RELIABILITY.md finding 3): groups are created
at id 0 with MKSTREAM, so a backlog written before the group existed is still delivered.
And the registration of a follower of a job's end (`watch_done`)."""

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


# a follower's done stream lives this long without a refresh (mark_done's own TTL as well)
DONE_TTL_S = 60


def watch_done(pipe: Any, done_key: str) -> None:
    """Queue on `pipe` (sync or asyncio) what makes a job's end wake its follower: a
    `follow` marker in its done stream (`Keys.done`; the stream is created by
    followers only; `mark_done` in _lib.lua writes the end there only if it exists), with
    the stream's TTL renewed. The XADD's answer (the first result) is the id to read the
    done stream after. The caller must read the job's state AFTER this ran: an end before
    it shows in that read, an end after it in the stream."""
    pipe.xadd(done_key, {"follow": "1"}, maxlen=1, approximate=False)
    pipe.expire(done_key, DONE_TTL_S)
