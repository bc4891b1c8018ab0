"""`tidal doctor`: compare Redis with itself and with the SQL mirror, repair what is safe,
and rebuild unfinished jobs from the mirror after Redis lost its data.

Checks (each `Finding.check`; `fixable` ones are repaired by `repair`, with what --fix does):

- `queued_orphan`: a queued job in no queue, delayed set, host wait list or deps set, so
  it would never run. Fix: back to its queue with its stored score (a host job only if it
  holds or can take its host; else behind the holder, in submission order).
- `retrying_orphan`: a retrying job not in the delayed set. Fix: back in at its retry time.
- `pending_orphan`: a pending job with no submissions entry: never admitted. Report only.
- `dispatched_no_entry`: a dispatched job whose dispatch entry is gone, so no worker can
  start it. Fix: requeue with reclaim.lua (fenced by the entry the job names).
- `running_no_entry`: a running job whose entry is gone or not pending: nothing would
  reclaim it if its worker died. Report only (its worker may be alive).
- `stale_dispatch_entry`: an entry of a finished, missing or re-dispatched job. Fix:
  XACK + XDEL.
- `dead_consumer`: entries pending on a worker whose heartbeat expired. Report only: a
  scheduler's reaper requeues them within `reap_interval_s`.
- `registry_orphan`: a worker in the registry with no heartbeat hash. Fix: ZREM.
- `host_orphan`: a host lock whose holder has ended or is gone, or waiters with no holder:
  the host would stay blocked. Fix: grant.lua hands it to the first waiter (or frees it),
  as the scheduler does when a holder ends.
- `recorder_behind`: events not yet mirrored. Fix: the recorder's catch-up.
- `mirror_missing` / `mirror_behind` / `mirror_differs`: the SQL row is absent, at an older
  event, or disagrees (state, attempt, exit code) at the same event. Fix: catch-up.
- `lost_from_redis`: unfinished in the mirror, absent from Redis. Fix: `--restore`.

Everything here talks to Redis and SQL directly, like the service commands; the recorder's
catch-up is passed in (it lives in scheduler/, which common/ must not import).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from common import scripts as sc
from common.hosts import hand_on
from common.jobs import submission_fields
from common.keys import GROUP_RECORDER, GROUP_SCHEDULERS, GROUP_WORKERS, Keys
from common.models import JobSubmission
from common.settings import Settings
from common.streams import ensure_group
from common.tables import JobRecord

TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
ACTIVE = frozenset({"pending", "queued", "dispatched", "running", "retrying"})
JOB_FIELDS = ("id", "state", "queue", "host", "dispatch_id", "score", "retry_at", "attempt",
              "exit_code", "seq", "created_at", "priority", "sub_seq")
BATCH = 500


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str  # a job id, a worker id, a stream
    detail: str
    fixable: bool = False
    data: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class RestoreReport:
    candidates: int = 0  # unfinished jobs in the mirror
    restored: int = 0  # resubmitted with their id
    present: int = 0  # already in Redis: left alone
    unreadable: int = 0  # their stored submission does not parse


Job = dict[str, str]


@dataclass
class Doctor:
    client: redis.Redis
    keys: Keys
    settings: Settings
    engine: Engine | None = None
    catch_up: Callable[[], int] | None = None
    scripts: sc.Scripts = field(init=False)

    def __post_init__(self) -> None:
        self.scripts = sc.Scripts(self.client)

    # -- examine ------------------------------------------------------------------------

    def examine(self) -> list[Finding]:
        jobs = self.jobs()
        found = (self.check_jobs(jobs) + self.check_dispatch() + self.check_workers()
                 + self.check_hosts())
        if self.engine is not None:
            found += self.check_recorder() + self.check_mirror(jobs)
        return found

    def jobs(self) -> dict[str, Job]:
        """Every job hash (the fields the checks need), by id."""
        out: dict[str, Job] = {}
        for keys in _chunks(self.client.scan_iter(match=self.keys.job_pattern(), count=1000)):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, *JOB_FIELDS)
            for values in pipe.execute():
                h = {k: v for k, v in zip(JOB_FIELDS, values, strict=True) if v is not None}
                if h.get("state") and h.get("id"):
                    out[h["id"]] = h
        return out

    def check_jobs(self, jobs: dict[str, Job]) -> list[Finding]:
        """Each unfinished job is where its state says."""
        found: list[Finding] = []
        submitted = self._submitted_ids()
        pending_entries = self._pending_dispatch_ids({h.get("queue", "default")
                                                      for h in jobs.values()})
        waiting = [h for h in jobs.values() if h["state"] in ("queued", "retrying")]
        placed = self._placed(waiting)
        for h in jobs.values():
            state, job_id = h["state"], h["id"]
            if state == "queued" and not placed[job_id]:
                found.append(Finding("queued_orphan", job_id, "queued but in no queue, delayed "
                                     "set, host wait list or deps set", True, h))
            elif state == "retrying" and not placed[job_id]:
                found.append(Finding("retrying_orphan", job_id, "retrying but not in the "
                                     "delayed set", True, h))
            elif state == "pending" and job_id not in submitted:
                found.append(Finding("pending_orphan", job_id, "pending with no submissions "
                                     "entry: it will never be admitted", False, h))
            elif state in ("dispatched", "running"):
                found += self._check_entry(h, pending_entries)
        return found

    def _check_entry(self, h: Job, pending: set[str]) -> list[Finding]:
        entry, queue = h.get("dispatch_id", ""), h.get("queue", "default")
        exists = bool(entry) and bool(self.client.xrange(self.keys.dispatch(queue), entry, entry))
        if h["state"] == "dispatched" and not exists:
            return [Finding("dispatched_no_entry", h["id"], f"its dispatch entry {entry!r} is "
                            "gone: no worker can start it", bool(entry), h)]
        if h["state"] == "running" and not (exists and entry in pending):
            return [Finding("running_no_entry", h["id"], f"its dispatch entry {entry!r} is "
                            "gone or not pending: nothing reclaims it if its worker dies",
                            False, h)]
        return []

    def _submitted_ids(self) -> set[str]:
        return {f.get("id", "") for _, f in self.client.xrange(self.keys.submissions())}

    def _pending_dispatch_ids(self, queues: set[str]) -> set[str]:
        ids: set[str] = set()
        for queue in queues:
            try:
                pending = self.client.xpending_range(self.keys.dispatch(queue), GROUP_WORKERS,
                                                     min="-", max="+", count=100_000)
            except redis.ResponseError:  # no group: nothing pending
                continue
            ids.update(p["message_id"] for p in pending)
        return ids

    def _placed(self, jobs: list[Job]) -> dict[str, bool]:
        """Whether each queued or retrying job is in a structure that leads to a run."""
        pipe = self.client.pipeline(transaction=False)
        for h in jobs:
            job_id = h["id"]
            pipe.zscore(self.keys.queue(h.get("queue", "default")), job_id)
            pipe.zscore(self.keys.delayed(), job_id)
            pipe.zscore(self.keys.hostwait(h["host"]) if h.get("host") else
                        self.keys.delayed(), job_id)
            pipe.scard(self.keys.deps(job_id))
        replies = pipe.execute() if jobs else []
        out: dict[str, bool] = {}
        for i, h in enumerate(jobs):
            in_queue, delayed, hostwait, deps = replies[4 * i: 4 * i + 4]
            out[h["id"]] = delayed is not None if h["state"] == "retrying" else (
                in_queue is not None or delayed is not None or hostwait is not None or deps > 0)
        return out

    def check_dispatch(self) -> list[Finding]:
        """Dispatch entries belong to the live attempt of an unfinished job; entries
        pending on a consumer belong to a live worker. Each job is read after its entry
        (dispatch.lua writes both at once), so a live entry is never taken for stale."""
        found: list[Finding] = []
        for queue in sorted(self.client.smembers(self.keys.queues())):
            entries = [(e, f.get("id", "")) for e, f in self.client.xrange(self.keys.dispatch(
                queue))]
            pipe = self.client.pipeline(transaction=False)
            for _, job_id in entries:
                pipe.hmget(self.keys.job(job_id), "state", "dispatch_id")
            for (entry, job_id), (state, current) in zip(
                entries, pipe.execute() if entries else [], strict=True
            ):
                if state is None or state in TERMINAL or current != entry:
                    why = "missing" if state is None else (
                        state if state in TERMINAL else "given another entry")
                    found.append(Finding("stale_dispatch_entry", job_id or entry,
                                         f"dispatch entry {entry} of a job that is {why}", True,
                                         {"queue": queue, "entry": entry}))
            found += self._dead_consumers(queue)
        return found

    def _dead_consumers(self, queue: str) -> list[Finding]:
        try:
            consumers = self.client.xinfo_consumers(self.keys.dispatch(queue), GROUP_WORKERS)
        except redis.ResponseError:
            return []
        busy = [c for c in consumers if int(c["pending"]) > 0]
        pipe = self.client.pipeline(transaction=False)
        for c in busy:
            pipe.exists(self.keys.worker(c["name"]))
        alive = pipe.execute() if busy else []
        return [Finding("dead_consumer", c["name"], f"{c['pending']} entries of queue {queue} "
                        "pending on a worker whose heartbeat expired (a scheduler's reaper "
                        "requeues them: is one running?)", False, {"queue": queue})
                for c, ok in zip(busy, alive, strict=True) if not ok]

    def check_workers(self) -> list[Finding]:
        members = self.client.zrange(self.keys.workers(), 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for worker in members:
            pipe.exists(self.keys.worker(worker))
        alive = pipe.execute() if members else []
        return [Finding("registry_orphan", w, "in the worker registry with no heartbeat hash",
                        True) for w, ok in zip(members, alive, strict=True) if not ok]

    def check_hosts(self) -> list[Finding]:
        """Every held host is held by an unfinished job; no host has waiters but no holder.
        (A holder's end is settled within a scheduler step, so a finding that stays is real.)"""
        hosts = sorted(self.client.smembers(self.keys.hosts()))
        pipe = self.client.pipeline(transaction=False)
        for host in hosts:
            pipe.get(self.keys.host(host))
            pipe.zcard(self.keys.hostwait(host))
        replies = pipe.execute() if hosts else []
        found: list[Finding] = []
        for i, host in enumerate(hosts):
            holder, waiters = replies[2 * i], int(replies[2 * i + 1])
            state = self.client.hget(self.keys.job(holder), "state") if holder else None
            if holder and state in TERMINAL | {None}:
                why = f"held by {holder}, which is {state or 'gone'}"
            elif not holder and waiters:
                why = f"{waiters} waiting and no holder"
            else:
                continue
            found.append(Finding("host_orphan", host, why, True, {"holder": holder or ""}))
        return found

    def check_recorder(self) -> list[Finding]:
        events = self.keys.events()
        try:
            groups = {g["name"]: g for g in self.client.xinfo_groups(events)}
        except redis.ResponseError:  # no events stream: nothing to record
            return []
        g = groups.get(GROUP_RECORDER)
        if g is None:
            n = self.client.xlen(events)
            return [Finding("recorder_behind", events, f"no recorder ever read the {n} "
                            "events (is one running? TIDAL_RECORDER)", True)] if n else []
        lag, pending = int(g.get("lag") or 0), int(g.get("pending") or 0)
        if lag or pending:
            return [Finding("recorder_behind", events, f"{lag} events not yet read and "
                            f"{pending} not yet applied", True)]
        return []

    def check_mirror(self, jobs: dict[str, Job]) -> list[Finding]:
        """Each job in Redis has an equal SQL row; each unfinished row is in Redis."""
        assert self.engine is not None
        found: list[Finding] = []
        rows = self._rows(list(jobs))
        for job_id, h in jobs.items():
            row = rows.get(job_id)
            if row is None:
                found.append(Finding("mirror_missing", job_id, "in Redis, not in the mirror",
                                     True))
                continue
            seq, state, attempt, exit_code = row
            if int(h.get("seq") or 0) > seq:
                found.append(Finding("mirror_behind", job_id, f"mirror at event {seq}, Redis "
                                     f"at {h.get('seq')}", True))
            elif (state, attempt, exit_code) != _redis_view(h):
                found.append(Finding("mirror_differs", job_id, f"mirror {state}/{attempt}/"
                                     f"{exit_code}, Redis {'/'.join(map(str, _redis_view(h)))} "
                                     "(state/attempt/exit code)", True))
        with Session(self.engine) as session:
            active = session.exec(select(JobRecord.id).where(col(JobRecord.state).in_(ACTIVE)))
            for job_id in active:
                if job_id not in jobs:
                    found.append(Finding("lost_from_redis", job_id, "unfinished in the mirror, "
                                         "absent from Redis (tidal doctor --restore)"))
        return found

    def _rows(self, ids: list[str]) -> dict[str, tuple[int, str, int, int | None]]:
        assert self.engine is not None
        rows: dict[str, tuple[int, str, int, int | None]] = {}
        with Session(self.engine) as session:
            for chunk in _chunks(iter(ids)):
                stmt = select(JobRecord.id, JobRecord.seq, JobRecord.state, JobRecord.attempt,
                              JobRecord.exit_code).where(col(JobRecord.id).in_(chunk))
                for job_id, seq, state, attempt, exit_code in session.exec(stmt):
                    rows[job_id] = (seq, state, attempt, exit_code)
        return rows

    # -- repair ---------------------------------------------------------------------------

    def repair(self, findings: list[Finding]) -> int:
        """Repair the fixable findings; the number of repairs made."""
        fixed = 0
        for f in findings:
            if f.fixable and f.check in _REPAIRS:
                fixed += _REPAIRS[f.check](self, f)
        if self.catch_up is not None and any(f.check in _MIRROR for f in findings):
            self.catch_up()
            fixed += sum(1 for f in findings if f.check in _MIRROR)
        return fixed

    def _requeue(self, f: Finding) -> int:
        """Back to its queue with its stored score; a host job only if it holds (or can
        take) its host, else behind the holder in submission order, as admit.lua does.
        Optimistic (WATCH): nothing is written if the job or its host changed meanwhile."""
        h, job_id = f.data, f.subject
        host = h.get("host")
        job_key = self.keys.job(job_id)
        watched = [job_key, self.keys.host(host)] if host else [job_key]

        def apply(pipe: Any) -> int:
            if pipe.hget(job_key, "state") != "queued":
                return 0
            holder = pipe.get(self.keys.host(host)) if host else job_id
            pipe.multi()
            if holder not in (None, job_id):
                order = float(h.get("sub_seq") or h.get("created_at") or 0)
                pipe.sadd(self.keys.hosts(), host)
                pipe.zadd(self.keys.hostwait(str(host)), {job_id: order}, nx=True)
                return 1
            if host:
                pipe.set(self.keys.host(host), job_id)
            score = h.get("score") or (int(h.get("created_at") or time.time() * 1000)
                                       + int(h.get("priority") or 2)
                                       * self.settings.priority_step_s * 1000)
            pipe.zadd(self.keys.queue(h.get("queue", "default")), {job_id: float(score)},
                      nx=True)
            return 1

        return int(self.client.transaction(apply, *watched, value_from_callable=True))

    def _redelay(self, f: Finding) -> int:
        job_key = self.keys.job(f.subject)

        def apply(pipe: Any) -> int:
            if pipe.hget(job_key, "state") != "retrying":
                return 0
            pipe.multi()
            due = float(f.data.get("retry_at") or time.time() * 1000)
            pipe.zadd(self.keys.delayed(), {f.subject: due}, nx=True)
            return 1

        return int(self.client.transaction(apply, job_key, value_from_callable=True))

    def _reclaim(self, f: Finding) -> int:
        s = self.settings
        requeued, ended = self.scripts.run(sc.reclaim(
            self.keys, f.data.get("queue", "default"), [(f.data["dispatch_id"], f.subject)],
            max_deliveries=s.max_deliveries, events_maxlen=s.events_maxlen, ttl_s=s.job_ttl_s,
            by="doctor"))
        return int(requeued) + int(ended)

    def _drop_entry(self, f: Finding) -> int:
        stream = self.keys.dispatch(f.data["queue"])
        self.client.xack(stream, GROUP_WORKERS, f.data["entry"])
        return int(self.client.xdel(stream, f.data["entry"]))

    def _hand_on(self, f: Finding) -> int:
        result = hand_on(self.client, self.scripts, self.keys, f.subject,
                         f.data.get("holder", ""))
        return int(result in ("granted", "free"))

    def _unregister(self, f: Finding) -> int:
        return int(self.client.zrem(self.keys.workers(), f.subject))

    # -- restore --------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Resubmit every unfinished job of the mirror that Redis does not have, with its
        id, owner, place in line (created_at), attempt count and event sequence, so it runs
        again and the mirror keeps one history per job."""
        assert self.engine is not None
        report = RestoreReport()
        for g in ((self.keys.submissions(), GROUP_SCHEDULERS), (self.keys.events(),
                                                                 GROUP_RECORDER)):
            ensure_group(self.client, *g)
        with Session(self.engine) as session:
            stmt = select(JobRecord).where(col(JobRecord.state).in_(ACTIVE)).order_by(
                col(JobRecord.created_at))
            records = list(session.exec(stmt))
            ended = self._ended_states(session, records)
        report.candidates = len(records)
        for rec in records:
            if self.client.exists(self.keys.job(rec.id)):
                report.present += 1
                continue
            try:
                sub = JobSubmission.model_validate(orjson.loads(rec.spec))
            except ValueError:
                report.unreadable += 1
                continue
            accepted = self._resubmit(rec, sub, ended)
            report.restored += accepted
            report.present += 1 - accepted
        return report

    def _resubmit(self, rec: JobRecord, sub: JobSubmission, ended: dict[str, str]) -> int:
        s = self.settings
        # dependencies that already ended as asked have no hash any more: drop them, or
        # depend.lua would take them for expired
        waiting = [d for d, long in zip(sub.depends_on, sub.dependencies(), strict=True)
                   if not _satisfied(ended.get(long.id), long.on)]
        if len(waiting) != len(sub.depends_on):
            sub = sub.model_copy(update={"depends_on": waiting})
        fields = submission_fields(sub, s.stale_after_s)
        fields.update(created_at=rec.created_at or int(time.time() * 1000),
                      attempt=rec.attempt, seq=rec.seq, restored_at=int(time.time() * 1000))
        reply = self.scripts.run(sc.submit(
            self.keys, rec.id, rec.owner, fields, events_maxlen=s.events_maxlen,
            idempotency_key=sub.idempotency_key))
        return 1 if int(reply[0]) == 1 else 0

    @staticmethod
    def _ended_states(session: Session, records: list[JobRecord]) -> dict[str, str]:
        """Mirror states of the jobs the restored ones depend on."""
        dep_ids: set[str] = set()
        for rec in records:
            spec: dict[str, Any] = orjson.loads(rec.spec or "{}")
            for dep in spec.get("depends_on") or []:
                dep_ids.add(dep if isinstance(dep, str) else str(dep.get("id")))
        stmt = select(JobRecord.id, JobRecord.state).where(col(JobRecord.id).in_(dep_ids))
        return dict(session.exec(stmt).all()) if dep_ids else {}


_REPAIRS: dict[str, Callable[[Doctor, Finding], int]] = {
    "queued_orphan": Doctor._requeue,
    "retrying_orphan": Doctor._redelay,
    "dispatched_no_entry": Doctor._reclaim,
    "stale_dispatch_entry": Doctor._drop_entry,
    "registry_orphan": Doctor._unregister,
    "host_orphan": Doctor._hand_on,
}
_MIRROR = frozenset({"recorder_behind", "mirror_missing", "mirror_behind", "mirror_differs"})


def _redis_view(h: Job) -> tuple[str, int, int | None]:
    code = h.get("exit_code")
    return h["state"], int(h.get("attempt") or 0), int(code) if code not in (None, "") else None


def _satisfied(state: str | None, on: str) -> bool:
    """depend.lua's rule, for a dependency that ended (None: unknown, not satisfied)."""
    if state not in TERMINAL:
        return False
    if on == "any":
        return True
    if on == "failure":
        return state in ("failed", "cancelled", "expired")
    return state == "completed"


def _chunks(items: Iterator[str], size: int = BATCH) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
