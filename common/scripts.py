"""The one registry of Lua scripts: loads common/lua/*.lua (with _lib.lua prepended),
registers each once per client (EVALSHA, reloaded on NOSCRIPT by redis-py), and offers one
typed function per script. Calls are built as `Call` values so the same code serves a
client, a pipeline (many jobs in one round trip) and the asyncio API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from common.keys import GROUP_SCHEDULERS, GROUP_WORKERS, Keys

SCRIPT_NAMES = (
    "submit",
    "admit",
    "depend",
    "resolve",
    "promote_due",
    "dispatch",
    "start",
    "finish",
    "cancel",
    "heartbeat",
    "reclaim",
    "grant",
    "settle",
    "expire",
    "retry",
    "cron_advance",
    "progress",
    "log_append",
    "mirror_read",
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

    def sha(self, name: str) -> str:
        return str(self._registered[name].sha)

    def execute(self, build: Callable[[Batch], object], *, raise_errors: bool = True
                ) -> list[Any]:
        """Send what `build` queues on a fresh Batch (script calls and plain commands) in
        ONE round trip (sync client). Script calls the server did not know (it restarted
        empty, or SCRIPT FLUSH) did not run: the scripts are loaded and those calls sent
        again. The first error is raised after all ran, as a plain call would (or, with
        `raise_errors` False, left in its place; connection errors always raise)."""
        batch = Batch(self.client.pipeline(transaction=False), self)
        build(batch)
        results = list(batch.pipe.execute(raise_on_error=False))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name in {batch.calls[i].script for i in missing}:
                self.client.script_load(self._registered[name].script)
            again = Batch(self.client.pipeline(transaction=False), self)
            for i in missing:
                again.script(batch.calls[i])
            for i, r in zip(missing, again.pipe.execute(raise_on_error=False), strict=True):
                results[i] = r
        for r in results:
            if raise_errors and isinstance(r, Exception):
                raise r
        return results

    def run_many(self, calls: Sequence[Call], *, raise_errors: bool = True) -> list[Any]:
        """Many script calls in one round trip (`execute`)."""
        if not calls:
            return []
        return self.execute(lambda batch: [batch.script(call) for call in calls],
                            raise_errors=raise_errors)


class Batch:
    """A pipeline whose script calls go by sha as plain EVALSHAs: a redis-py pipeline that
    carries Script objects sends SCRIPT EXISTS first, one more round trip every time.
    Other commands are the pipeline's own."""

    def __init__(self, pipe: Any, scripts: Scripts) -> None:
        self.pipe = pipe
        self._scripts = scripts
        self.calls: dict[int, Call] = {}  # position in the pipeline → the script call

    def script(self, call: Call) -> None:
        self.calls[len(self.pipe)] = call
        self.pipe.evalsha(self._scripts.sha(call.script), len(call.keys), *call.keys,
                          *call.args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __len__(self) -> int:
        return len(self.pipe)


# -- call builders, one per script -------------------------------------------------------


def _host_keys(keys: Keys, host: str | None, stand_in: str) -> list[str]:
    """A job's host string and hostwait zset; with no host, a stand-in key (unused)."""
    return [keys.host(host), keys.hostwait(host)] if host else [stand_in, stand_in]


def _pairs(fields: dict[str, Any]) -> list[Any]:
    flat: list[Any] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat


def submit(
    keys: Keys,
    job_id: str,
    owner: str,
    fields: dict[str, str | int | float],
    *,
    events_maxlen: int,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = 86400,
    max_active: int = 0,
    max_queue: int = 0,
) -> Call:
    """fields: the job hash fields (common.jobs.submission_fields), `queue` among them."""
    idem = keys.idem(owner, idempotency_key) if idempotency_key else keys.job(job_id)
    ttl = idempotency_ttl_s if idempotency_key else 0
    return Call(
        "submit",
        [keys.job(job_id), keys.submissions(), keys.events(), idem, keys.user(owner),
         keys.queue(str(fields.get("queue", "default"))), keys.seq()],
        [job_id, events_maxlen, ttl, owner, max_active, max_queue, *_pairs(fields)],
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """A submissions entry as the scheduler reads it."""

    entry_id: str
    job_id: str
    queue: str
    host: str | None = None


def admit(
    keys: Keys, entries: Sequence[Admission], *, events_maxlen: int, priority_step_ms: int,
    by: str,
) -> Call:
    ks = [keys.submissions(), keys.events(), keys.delayed(), keys.queues(), keys.hosts(),
          keys.stale()]
    args: list[Any] = [GROUP_SCHEDULERS, events_maxlen, priority_step_ms, by]
    for a in entries:
        job = keys.job(a.job_id)
        ks += [job, keys.queue(a.queue), *_host_keys(keys, a.host, job)]
        args += [a.entry_id, a.queue]
    return Call("admit", ks, args)


def depend(
    keys: Keys, a: Admission, deps: Sequence[tuple[str, str]], *, events_maxlen: int,
    priority_step_ms: int, by: str,
) -> Call:
    """deps: (dependency id, condition: success | failure | any)."""
    job = keys.job(a.job_id)
    ks = [keys.submissions(), keys.events(), keys.settle(), keys.queues(), job,
          keys.deps(a.job_id), keys.queue(a.queue), keys.delayed(),
          *_host_keys(keys, a.host, job), keys.hosts(), keys.stale(), keys.done(a.job_id),
          keys.finished()]
    args: list[Any] = [GROUP_SCHEDULERS, a.entry_id, events_maxlen, priority_step_ms, by, a.queue]
    for dep_id, cond in deps:
        ks += [keys.job(dep_id), keys.dependents(dep_id)]
        args += [dep_id, cond]
    return Call("depend", ks, args)


def resolve(
    keys: Keys, dependent: str, queue: str, host: str | None, ended: str, ended_state: str,
    *, events_maxlen: int, priority_step_ms: int, by: str,
) -> Call:
    job = keys.job(dependent)
    return Call(
        "resolve",
        [keys.events(), keys.settle(), job, keys.deps(dependent), keys.queue(queue),
         keys.delayed(), *_host_keys(keys, host, job), keys.hosts(), keys.stale(),
         keys.done(dependent), keys.finished()],
        [ended, ended_state, events_maxlen, priority_step_ms, by],
    )


def promote_due(
    keys: Keys, candidates: Sequence[tuple[str, str, str | None]], *, events_maxlen: int,
    priority_step_ms: int, by: str,
) -> Call:
    """candidates: (job id, queue name, host)."""
    ks = [keys.delayed(), keys.events(), keys.hosts()]
    for job_id, queue, host in candidates:
        job = keys.job(job_id)
        ks += [job, keys.queue(queue), *_host_keys(keys, host, job)]
    return Call("promote_due", ks,
                [events_maxlen, priority_step_ms, by, *(c[0] for c in candidates)])


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the live workers of a queue offer: slots, usable resources (after overcommit
    and reserve) and the largest single worker's resources."""

    slots: int
    cpu: float = 0.0
    memory_mb: int = 0
    gpu: int = 0
    max_cpu: float = 0.0
    max_memory_mb: int = 0
    max_gpu: int = 0


def dispatch(
    keys: Keys, queue: str, candidates: Sequence[str], *, capacity: Capacity | None,
    events_maxlen: int, by: str,
) -> Call:
    """capacity None: the one the scheduler published (a worker's call; see dispatch.lua)."""
    c = capacity
    cap: list[Any] = ["*", "", "", "", "", "", ""] if c is None else [
        c.slots, c.cpu, c.memory_mb, c.gpu, c.max_cpu, c.max_memory_mb, c.max_gpu]
    return Call(
        "dispatch",
        [keys.queue(queue), keys.dispatch(queue), keys.events(), keys.ledger(), keys.stale(),
         keys.capacity(queue), *map(keys.job, candidates)],
        [cap[0], events_maxlen, by, *cap[1:], *candidates],
    )


def start(
    keys: Keys, queue: str, entries: Sequence[tuple[str, str]], *, worker: str, events_maxlen: int
) -> Call:
    """entries: (dispatch entry id, job id)."""
    return Call(
        "start",
        [keys.dispatch(queue), keys.events(), keys.worker(worker),
         *(keys.job(job_id) for _, job_id in entries)],
        [GROUP_WORKERS, events_maxlen, worker, *(entry for entry, _ in entries)],
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # completed | failed | cancelled
    exit_code: int | None = None
    result: str = ""  # JSON text
    error: str = ""
    reason: str = ""
    # what the attempt used, stored on the job hash as is (shell jobs: peak_rss_kb and
    # cpu_s of the process tree); a tuple of (field, value) so the Outcome stays hashable
    usage: tuple[tuple[str, str], ...] = ()


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
    owner: str = "",
) -> Call:
    """owner: the job's owner, to settle a job without host or dependents in the same
    call ('': always on the settle stream; see finish.lua)."""
    return Call(
        "finish",
        [keys.job(job_id), keys.dispatch(queue), keys.events(), keys.delayed(), keys.log(job_id),
         keys.ledger(), keys.settle(), keys.done(job_id), keys.finished(),
         keys.user(owner) if owner else keys.job(job_id), keys.dependents(job_id)],
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
            owner,
            *(item for pair in outcome.usage for item in pair),
        ],
    )


def finish_batch(calls: Sequence[Call]) -> Call:
    """Many `finish` calls as ONE finish.lua call (its batch mode): the worker's finisher
    sends every outcome ready in one EVALSHA, not one per job (packing and parsing a
    pipeline of N EVALSHAs was most of a worker's remaining CPU per job). The calls must
    share the events/delayed/ledger/settle/finished keys, the group, MAXLEN, TTL and worker
    id, as one worker's do. The answer is a list with one answer per call, in order."""
    first = calls[0]
    shared_keys = [first.keys[2], first.keys[3], first.keys[5], first.keys[6], first.keys[8]]
    group, maxlen, ttl, worker = first.args[1], first.args[7], first.args[8], first.args[10]
    keys: list[str] = list(shared_keys)
    args: list[Any] = ["*", group, maxlen, ttl, worker]
    for call in calls:
        k, a = call.keys, call.args
        if ([k[2], k[3], k[5], k[6], k[8]] != shared_keys
                or (a[1], a[7], a[8], a[10]) != (group, maxlen, ttl, worker)):
            raise ValueError("finish_batch: calls of different workers or settings")
        keys += [k[0], k[1], k[4], k[7], k[9], k[10]]
        usage = a[12:]
        args += [a[0], a[2], a[3], a[4], a[5], a[6], a[9], a[11], len(usage) // 2, *usage]
    return Call("finish", keys, args)

def cancel(
    keys: Keys, job_id: str, queue: str, *, host: str | None = None, by: str,
    events_maxlen: int, ttl_s: int,
) -> Call:
    job = keys.job(job_id)
    return Call(
        "cancel",
        [job, keys.queue(queue), keys.delayed(), keys.dispatch(queue), keys.events(),
         keys.log(job_id), keys.hostwait(host) if host else job, keys.stale(), keys.ledger(),
         keys.settle(), keys.done(job_id), keys.finished()],
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
    return Call(
        "heartbeat",
        [keys.worker(worker_id), keys.workers(), *(keys.job(j) for j, _ in running)],
        [worker_id, ttl_ms, ",".join(j for j, _ in running), len(running),
         *(token for _, token in running), *_pairs(fields)],
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
    handed_back: bool = False,
) -> Call:
    """entries: (dispatch entry id, job id) claimed from dead consumers, or handed back by
    a stopping worker (`handed_back`: such attempts spend no retry and count apart from
    the lost ones, so they never make a job poison)."""
    return Call(
        "reclaim",
        [keys.dispatch(queue), keys.queue(queue), keys.events(), keys.ledger(), keys.settle(),
         keys.finished(),
         *(key for _, job_id in entries for key in (keys.job(job_id), keys.done(job_id)))],
        [GROUP_WORKERS, events_maxlen, max_deliveries, ttl_s, by,
         "handed_back" if handed_back else "lost", *(entry for entry, _ in entries)],
    )


def grant(
    keys: Keys, host: str, released: str, waiter: str | None, waiter_queue: str | None
) -> Call:
    stand_in = keys.host(host)
    return Call(
        "grant",
        [keys.host(host), keys.hostwait(host), keys.hosts(),
         keys.job(waiter) if waiter else stand_in,
         keys.queue(waiter_queue) if waiter and waiter_queue else stand_in],
        [released, waiter or "", host],
    )


@dataclass(slots=True)
class Settlement:
    """A settle entry (a job that ended) and what its caller read for it: the waiter it
    proposes for the job's host ('' none), and the dependents to tell, each as
    (job id, queue, host); None when not read yet (settle.lua asks when there are any)."""

    entry_id: str
    job_id: str
    state: str
    owner: str
    host: str = ""
    waiter: str = ""
    waiter_queue: str = "default"
    dependents: list[tuple[str, str, str | None]] | None = None


def settle(
    keys: Keys, entries: Sequence[Settlement], *, events_maxlen: int, priority_step_ms: int,
    by: str,
) -> Call:
    """Settle a batch of entries in one call (settle.lua); it returns those left to do."""
    ks = [keys.settle(), keys.events(), keys.delayed(), keys.hosts(), keys.stale(),
          keys.finished()]
    args: list[Any] = [GROUP_SCHEDULERS, events_maxlen, priority_step_ms, by]
    for e in entries:
        ks += [keys.user(e.owner), keys.deps(e.job_id), keys.dependents(e.job_id)]
        if e.host:
            ks += [keys.host(e.host), keys.hostwait(e.host)]
            if e.waiter:
                ks += [keys.job(e.waiter), keys.queue(e.waiter_queue)]
        for dep, queue, host in e.dependents or ():
            job = keys.job(dep)
            ks += [job, keys.deps(dep), keys.queue(queue), *_host_keys(keys, host, job),
                   keys.done(dep)]
        args += [e.entry_id, e.job_id, e.state, e.host, e.waiter if e.host else "",
                 -1 if e.dependents is None else len(e.dependents)]
    return Call("settle", ks, args)


def expire(
    keys: Keys, candidates: Sequence[tuple[str, str, str | None]], *, events_maxlen: int,
    ttl_s: int, by: str,
) -> Call:
    """candidates: (job id, queue name, host)."""
    ks = [keys.events(), keys.settle(), keys.stale(), keys.delayed(), keys.finished()]
    for job_id, queue, host in candidates:
        job = keys.job(job_id)
        ks += [job, keys.queue(queue), keys.hostwait(host) if host else job, keys.done(job_id)]
    return Call("expire", ks, [events_maxlen, ttl_s, by, *(c[0] for c in candidates)])


def retry(keys: Keys, job_id: str, owner: str, *, by: str, events_maxlen: int) -> Call:
    return Call(
        "retry",
        [keys.job(job_id), keys.submissions(), keys.events(), keys.user(owner),
         keys.log(job_id), keys.done(job_id)],
        [job_id, by, events_maxlen],
    )


def cron_advance(keys: Keys, name: str, fired_ms: int, next_ms: int) -> Call:
    return Call("cron_advance", [keys.cron()], [name, fired_ms, next_ms])


def progress(
    keys: Keys,
    job_id: str,
    token: str,
    *,
    percent: str,
    stage: str,
    message: str,
    text: str,
    log_maxlen: int,
    event: bool,
    events_maxlen: int,
) -> Call:
    """A running attempt's progress report (fenced by its token); see progress.lua."""
    return Call(
        "progress",
        [keys.job(job_id), keys.log(job_id), keys.events()],
        [token, percent, stage, message, text, log_maxlen, "1" if event else "0",
         events_maxlen],
    )


def log_append(
    keys: Keys, job_id: str, lines: Sequence[Any], *, maxlen: int, publish: int = 0
) -> Call:
    """lines: flat (s, t, l, c) per run: c 'n' = l holds several lines, each ended by
    '\n'; '1' = a piece of an over-long line that continues; '' = one line. `publish`: the
    count sent on the job's log channel after the lines (0: none)."""
    return Call(
        "log_append",
        [keys.log(job_id)],
        [maxlen, keys.log_channel(job_id) if publish else "", publish, *lines],
    )


def mirror_read(keys: Keys, job_ids: Sequence[str], fields: Sequence[str],
                log_len_of: set[str]) -> Call:
    """The recorder's read of a batch: `fields` of every job's hash, and the length of the
    log stream of the jobs in `log_len_of` (-1 for the others)."""
    flat_keys: list[str] = []
    for job_id in job_ids:
        flat_keys += [keys.job(job_id), keys.log(job_id)]
    return Call("mirror_read", flat_keys,
                [len(fields), *fields, *("1" if j in log_len_of else "0" for j in job_ids)])
