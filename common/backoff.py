"""Exponential backoff with jitter, as one pure function (table-tested in
tests/unit/test_backoff.py). Used for job retries (the delay before the next attempt) and
for the services' own reconnect and retry loops."""

from __future__ import annotations

import math
import random
from collections.abc import Callable


def retry_delay_s(
    attempt: int,
    delay: float,
    backoff: float,
    max_delay: float,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    The base is `delay * backoff ** (attempt - 1)`, capped at `max_delay`; it is then
    spread by up to ±`jitter` (a fraction of the base) with `rand()` in [0, 1), so many
    failures at once do not retry in lockstep. The answer stays within [0, max_delay].
    """
    if delay <= 0 or max_delay <= 0:
        return 0.0
    exponent = max(attempt, 1) - 1
    # compare in log space: backoff ** exponent overflows a float long before 10 ** 308
    if backoff > 1 and exponent * math.log(backoff) >= math.log(max_delay / delay):
        base = max_delay
    else:
        base = min(max_delay, delay * backoff**exponent)
    spread = 1.0 + jitter * (2.0 * rand() - 1.0)
    return max(0.0, min(max_delay, base * spread))
