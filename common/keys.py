"""Every Redis key and channel name Tidal uses, built in one place.

Nothing else in the code base spells a key: a unit test greps the tree for the prefix.
The braces in the default prefix make every key hash to one Redis Cluster slot, so
multi-key Lua scripts also work on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "{tidal}"

# Consumer group names (streams are created with MKSTREAM at id 0, never "$").
GROUP_SCHEDULERS = "schedulers"
GROUP_WORKERS = "workers"
GROUP_RECORDER = "recorder"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    # -- streams -----------------------------------------------------------------
    def submissions(self) -> str:
        """stream: accepted job ids waiting for admission; group `schedulers`."""
        return f"{self.prefix}:submissions"

    def dispatch(self, queue: str) -> str:
        """stream: jobs handed to workers of `queue`; group `workers`. Entries are
        XDELed when the job finishes, so XLEN is the number of jobs in flight."""
        return f"{self.prefix}:dispatch:{queue}"

    def events(self) -> str:
        """stream (capped): every state transition; group `recorder`."""
        return f"{self.prefix}:events"

    def log(self, job_id: str) -> str:
        """stream (capped): the job's output lines, for replay and resume."""
        return f"{self.prefix}:log:{job_id}"

    def done(self, job_id: str) -> str:
        """stream (one entry, short TTL): written when the job finishes, so log followers
        blocked on its log stream wake at once (a job may end without a last line)."""
        return f"{self.prefix}:done:{job_id}"

    # -- job state ----------------------------------------------------------------
    def job(self, job_id: str) -> str:
        """hash: the job document (state, attempt, owner, timestamps, spec …)."""
        return f"{self.prefix}:job:{job_id}"

    def job_pattern(self) -> str:
        """SCAN pattern matching every job hash (operations tools only)."""
        return f"{self.prefix}:job:*"

    def capacity(self, queue: str) -> str:
        """hash + TTL: what the live workers of `queue` offer (slots, cpu, memory_mb, gpu,
        max_cpu, max_memory_mb, max_gpu), as the scheduler last counted it; workers read
        it to dispatch for their own free slots (dispatch.lua)."""
        return f"{self.prefix}:capacity:{queue}"

    def queue(self, queue: str) -> str:
        """zset: queued job ids by score (enqueue ms + level × priority step)."""
        return f"{self.prefix}:queue:{queue}"

    def queues(self) -> str:
        """set: names of every queue that has ever had a job."""
        return f"{self.prefix}:queues"

    def delayed(self) -> str:
        """zset: job ids by due time in ms (scheduled starts, retry backoff)."""
        return f"{self.prefix}:delayed"

    def host(self, host: str) -> str:
        """string (with lease): id of the job holding the host."""
        return f"{self.prefix}:host:{host}"

    def hostwait(self, host: str) -> str:
        """zset: jobs waiting for the host, by score."""
        return f"{self.prefix}:hostwait:{host}"

    def deps(self, job_id: str) -> str:
        """set: unfinished dependencies of the job."""
        return f"{self.prefix}:deps:{job_id}"

    def dependents(self, job_id: str) -> str:
        """set: jobs that wait for this one."""
        return f"{self.prefix}:dependents:{job_id}"

    def idem(self, owner: str, key: str) -> str:
        """string (TTL): idempotency key of one user → job id."""
        return f"{self.prefix}:idem:{owner}:{key}"

    def user(self, user: str) -> str:
        """hash: per-user counters for limits (`active`: accepted, not yet finished)."""
        return f"{self.prefix}:user:{user}"

    def hosts(self) -> str:
        """set: host names that have a holder or waiters."""
        return f"{self.prefix}:hosts"

    def seq(self) -> str:
        """string (counter): submission order, stamped on each job as `sub_seq`."""
        return f"{self.prefix}:seq"

    def finished(self) -> str:
        """stream (capped): one entry (`job`, `state`) per job reaching a terminal state,
        so the API's long-polls that wait only for the end (`until=finished`, POST
        /jobs?wait=) wake once per job, not at each of its transitions."""
        return f"{self.prefix}:finished"

    def settle(self) -> str:
        """stream: jobs that ended and need follow-up (host hand-off, dependents, user
        counter); group `schedulers`."""
        return f"{self.prefix}:settle"

    def ledger(self) -> str:
        """hash: resources held by dispatched and running jobs (cpu, memory_mb, gpu)."""
        return f"{self.prefix}:ledger"

    def stale(self) -> str:
        """zset: queued job ids by the ms they expire (created + stale_after)."""
        return f"{self.prefix}:stale"

    def cron(self) -> str:
        """zset: schedule names by next fire time (ms)."""
        return f"{self.prefix}:cron"

    def cron_specs(self) -> str:
        """hash: schedule name → JSON {cron, owner, job}."""
        return f"{self.prefix}:cronspec"

    # -- workers ------------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """hash + TTL: heartbeat of one worker (hostname, pid, queues, slots, running)."""
        return f"{self.prefix}:worker:{worker_id}"

    def workers(self) -> str:
        """zset: worker ids by last heartbeat (ms, Redis clock)."""
        return f"{self.prefix}:workers"

    # -- pub/sub channels (not keys, but named here too) ----------------------------
    def log_channel(self, job_id: str) -> str:
        """pub/sub: the job's output lines, live (a wake-up hint; the stream is the record)."""
        return f"{self.prefix}:logs:{job_id}"

    def control_channel(self, worker_id: str) -> str:
        """pub/sub: control messages for one worker (cancel requests)."""
        return f"{self.prefix}:control:{worker_id}"

    def control_channel_prefix(self) -> str:
        """Prefix that Lua appends a worker id to (channels are not keys)."""
        return f"{self.prefix}:control:"

    # -- scheduler figures ------------------------------------------------------------
    def schedulers(self) -> str:
        """zset: scheduler ids by when they last reported their loop figures (ms)."""
        return f"{self.prefix}:schedulers"

    def scheduler_loop(self, scheduler_id: str) -> str:
        """string (short TTL, so a dead scheduler's lapses): JSON figures of the scheduler's
        loop passes, a histogram of their durations (GET /metrics)."""
        return f"{self.prefix}:sched:{scheduler_id}"
