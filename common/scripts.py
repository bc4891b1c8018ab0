"""The one registry of Lua scripts: loads common/lua/*.lua (with _lib.lua prepended),
registers each once per client (EVALSHA, reloaded on NOSCRIPT by redis-py), and offers one
typed function per script. Calls are built as `Call` values so the same code serves a
client, a pipeline (many jobs in one round trip) and the asyncio API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from common.errors import Conflict, JobNotFound, LockLost, ScriptError
from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys

SCRIPT_NAMES = (
    "submit",
    "admit",
    "promote_due",
    "dispatch",
    "start",
    "finish",
    "cancel",
    "heartbeat",
    "reclaim",
)


@cache
def source(name: str) -> str:
    """The full text sent to Redis for one script: _lib.lua, then the script."""
    lua = resources.files("common") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Call:
    script: str
    keys: list[str]
    args: list[Any]


class Scripts:
    """Scripts registered on one client (sync or asyncio; both expose register_script)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._registered = {name: client.register_script(source(name)) for name in SCRIPT_NAMES}

    def run(self, call: Call, pipe: Any = None) -> Any:
        """Run a call now (sync client), on a pipeline (queued), or return an awaitable
        (asyncio client)."""
        return self._registered[call.script](keys=call.keys, args=call.args, client=pipe)


# -- call builders, one per script -------------------------------------------------------


def submit(
    keys: Keys,
    job_id: str,
    owner: str,
    fields: dict[str, str | int | float],
    *,
    events_maxlen: int,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = 86400,
) -> Call:
    flat: list[Any] = []
    for name, value in fields.items():
        flat += [name, value]
    idem = keys.idem(owner, idempotency_key) if idempotency_key else keys.job(job_id)
    ttl = idempotency_ttl_s if idempotency_key else 0
    return Call(
        "submit",
        [keys.job(job_id), keys.submissions(), keys.events(), idem],
        [job_id, events_maxlen, ttl, owner, *flat],
    )


def admit(
    keys: Keys,
    entries: Sequence[tuple[str, str, str]],
    *,
    events_maxlen: int,
    priority_step_ms: int,
    by: str,
) -> Call:
    """entries: (submissions entry id, job id, queue name)."""
    ks = [keys.submissions(), keys.events(), keys.delayed(), keys.queues()]
    args: list[Any] = [GROUP_SCHEDULERS, events_maxlen, priority_step_ms, by]
    for entry_id, job_id, queue in entries:
        ks += [keys.job(job_id), keys.queue(queue)]
        args += [entry_id, queue]
    return Call("admit", ks, args)


def promote_due(
    keys: Keys,
    candidates: Sequence[tuple[str, str]],
    *,
    events_maxlen: int,
    priority_step_ms: int,
    by: str,
) -> Call:
    """candidates: (job id, queue name)."""
    ks = [keys.delayed(), keys.events()]
    args: list[Any] = [events_maxlen, priority_step_ms, by]
    for job_id, queue in candidates:
        ks += [keys.job(job_id), keys.queue(queue)]
    args += [job_id for job_id, _ in candidates]
    return Call("promote_due", ks, args)


def dispatch(
    keys: Keys, queue: str, candidates: Sequence[str], *, capacity: int, events_maxlen: int, by: str
) -> Call:
    return Call(
        "dispatch",
        [keys.queue(queue), keys.dispatch(queue), keys.events(), *map(keys.job, candidates)],
        [capacity, events_maxlen, by, *candidates],
    )


def start(
    keys: Keys, queue: str, entries: Sequence[tuple[str, str]], *, worker: str, events_maxlen: int
) -> Call:
    """entries: (dispatch entry id, job id)."""
    return Call(
        "start",
        [keys.dispatch(queue), keys.events(), *(keys.job(job_id) for _, job_id in entries)],
        [GROUP_WORKERS, events_maxlen, worker, *(entry for entry, _ in entries)],
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # completed | failed | cancelled
    exit_code: int | None = None
    result: str = ""  # JSON text
    error: str = ""
    reason: str = ""


def finish(
    keys: Keys,
    job_id: str,
    queue: str,
    token: str,
    outcome: Outcome,
    *,
    worker: str,
    retry_delay_ms: int,
    events_maxlen: int,
    ttl_s: int,
) -> Call:
    return Call(
        "finish",
        [keys.job(job_id), keys.dispatch(queue), keys.events(), keys.delayed(), keys.log(job_id)],
        [
            token,
            GROUP_WORKERS,
            outcome.state,
            "" if outcome.exit_code is None else outcome.exit_code,
            outcome.result,
            outcome.error,
            outcome.reason,
            events_maxlen,
            ttl_s,
            retry_delay_ms,
            worker,
        ],
    )


def cancel(
    keys: Keys, job_id: str, queue: str, *, by: str, events_maxlen: int, ttl_s: int
) -> Call:
    return Call(
        "cancel",
        [
            keys.job(job_id),
            keys.queue(queue),
            keys.delayed(),
            keys.dispatch(queue),
            keys.events(),
            keys.log(job_id),
        ],
        [by, events_maxlen, ttl_s, keys.control_channel_prefix(), GROUP_WORKERS],
    )


def heartbeat(
    keys: Keys,
    worker_id: str,
    running: Sequence[tuple[str, str]],
    fields: dict[str, str | int],
    *,
    ttl_ms: int,
) -> Call:
    """running: (job id, fencing token) of each job the worker runs."""
    flat: list[Any] = []
    for name, value in fields.items():
        flat += [name, value]
    return Call(
        "heartbeat",
        [keys.worker(worker_id), keys.workers(), *(keys.job(j) for j, _ in running)],
        [worker_id, ttl_ms, ",".join(j for j, _ in running), len(running),
         *(token for _, token in running), *flat],
    )


def reclaim(
    keys: Keys,
    queue: str,
    entries: Sequence[tuple[str, str]],
    *,
    max_deliveries: int,
    events_maxlen: int,
    ttl_s: int,
    by: str,
) -> Call:
    """entries: (dispatch entry id, job id) claimed from dead consumers."""
    return Call(
        "reclaim",
        [keys.dispatch(queue), keys.queue(queue), keys.events(),
         *(keys.job(job_id) for _, job_id in entries)],
        [GROUP_WORKERS, events_maxlen, max_deliveries, ttl_s, by,
         *(entry for entry, _ in entries)],
    )


# -- results ------------------------------------------------------------------------------


def check(result: Any, job_id: str = "") -> Any:
    """Turn a script's negative error code into the matching exception."""
    if isinstance(result, int) and result < 0:
        if result == -1:
            raise (LockLost if job_id else Conflict)(f"job {job_id}: stale attempt or finished")
        if result == -2:
            raise Conflict(f"job {job_id} is not running")
        if result == -3:
            raise JobNotFound(f"job {job_id} not found")
        raise ScriptError(f"script answered {result} for job {job_id}")
    return result
