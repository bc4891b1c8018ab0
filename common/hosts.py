"""Handing a host on, shared by the scheduler's settle duty and `tidal doctor --fix`."""

from __future__ import annotations

import redis

from common import scripts as sc
from common.keys import Keys

GRANT_TRIES = 8  # a proposed waiter may have gone meanwhile: read the head again


def hand_on(client: redis.Redis, scripts: sc.Scripts, keys: Keys, host: str, released: str) -> str:
    """Let `released` go of `host` (if it holds it) and grant the host to the first waiter;
    grant.lua's answer: granted, held, free (or retry, if the head kept changing)."""
    result = "retry"
    for _ in range(GRANT_TRIES):
        head = client.zrange(keys.hostwait(host), 0, 0)
        waiter = head[0] if head else None
        queue = client.hget(keys.job(waiter), "queue") if waiter else None
        result = str(scripts.run(sc.grant(keys, host, released, waiter, queue or "default")))
        if result != "retry":
            break
    return result
