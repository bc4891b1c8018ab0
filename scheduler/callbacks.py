"""Job callbacks: a POST of the job document to the job's `callback_url` when it ends.

The recorder writes one `callbacks` row (an outbox) in the same transaction as the job's
terminal event, so every terminal state of a job with a callback_url gets exactly one row
(a replay adds none). `CallbackSender.tick()`, called from the recorder's loop, claims due
rows and hands them to a small thread pool: nothing here ever waits on a receiver in the
recorder's thread, and the job itself finished before any of this began.

Delivery is at least once: a 2xx answer marks the row `delivered`; anything else (another
status, a timeout, a refused connection) is recorded on the row (`attempts`,
`status_code`, `error`) and tried again after an exponential back-off, until
`max_attempts`, when the row is `failed`. GET /jobs/{id}/events shows the outcome as a
`callback_delivered`, `callback_failed` or `callback_pending` entry. Each POST carries
`X-Tidal-Job` and `X-Tidal-Seq` so a receiver can drop duplicates. Redirects are not
followed. A claim is a lease (`claimed_until`), so two recorders never post the same row
at once, and a sender that died leaves it to another after the lease.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import redis
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from common.backoff import retry_delay_s
from common.clock import now_ms
from common.jobs import hash_from_record, job_from_hash
from common.keys import Keys
from common.logging import get_logger
from common.tables import CallbackRecord, JobRecord

log = get_logger("callbacks")

USER_AGENT = "tidal-callback/0.1"


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    concurrency: int = 4  # POSTs in flight per sender
    timeout_s: float = 10.0  # per POST
    max_attempts: int = 8
    delay_s: float = 2.0  # back-off: 2 s, 4 s, 8 s … at most max_delay_s
    max_delay_s: float = 300.0
    lease_s: float = 60.0  # a claimed row is left alone this long

    @property
    def lease_ms(self) -> int:
        return int((self.timeout_s + self.lease_s) * 1000)


@dataclass(frozen=True, slots=True)
class Due:
    id: int
    job_id: str
    seq: int
    url: str
    attempts: int


class CallbackSender:
    def __init__(self, client: redis.Redis, keys: Keys, engine: Engine,
                 policy: CallbackPolicy | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.client, self.keys, self.engine = client, keys, engine
        self.policy = policy or CallbackPolicy()
        self.http = httpx.Client(timeout=self.policy.timeout_s, follow_redirects=False,
                                 headers={"User-Agent": USER_AGENT}, transport=transport)
        self.pool = ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="callback")
        self.busy: set[int] = set()
        self.lock = threading.Lock()

    def tick(self) -> int:
        """Claim the due rows there is room for and start posting them; returns how many."""
        with self.lock:
            room = self.policy.concurrency - len(self.busy)
        if room <= 0:
            return 0
        claimed = self._claim(room)
        for due in claimed:
            with self.lock:
                self.busy.add(due.id)
            self.pool.submit(self._deliver, due)
        return len(claimed)

    def idle(self) -> bool:
        with self.lock:
            return not self.busy

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    # -- the outbox ---------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Due]:
        now = now_ms()
        table = CallbackRecord.__table__  # type: ignore[attr-defined]
        stmt = (
            select(CallbackRecord.id, CallbackRecord.job_id, CallbackRecord.seq,
                   CallbackRecord.url, CallbackRecord.attempts)
            .where(CallbackRecord.status == "pending", col(CallbackRecord.next_at) <= now,
                   col(CallbackRecord.claimed_until) <= now)
            .order_by(col(CallbackRecord.next_at)).limit(limit)
        )
        claimed = []
        with self.engine.begin() as conn:
            for row in conn.execute(stmt).all():
                took = conn.execute(update(table).where(
                    table.c.id == row.id, table.c.claimed_until <= now,
                    table.c.status == "pending",
                ).values(claimed_until=now + self.policy.lease_ms))
                if took.rowcount == 1:
                    claimed.append(Due(row.id, row.job_id, row.seq, row.url, row.attempts))
        return claimed

    def _record(self, due: Due, **values: Any) -> None:
        table = CallbackRecord.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == due.id).values(
                claimed_until=0, updated_at=now_ms(), **values))

    # -- one delivery ---------------------------------------------------------------------

    def _document(self, job_id: str) -> dict[str, Any] | None:
        h = self.client.hgetall(self.keys.job(job_id))
        if not h.get("state"):
            with Session(self.engine) as session:
                rec = session.get(JobRecord, job_id)
            h = hash_from_record(rec) if rec is not None else {}
        return job_from_hash(h).model_dump(mode="json") if h.get("state") else None

    def _post(self, due: Due) -> tuple[int | None, str | None]:
        """(status code, error): error None means delivered."""
        try:
            doc = self._document(due.job_id)
        except redis.RedisError as exc:
            return None, f"could not read the job: {exc}"
        if doc is None:
            return None, "the job no longer exists"
        try:
            response = self.http.post(due.url, json=doc, headers={
                "X-Tidal-Job": due.job_id, "X-Tidal-Seq": str(due.seq)})
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        if response.is_success:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    def _deliver(self, due: Due) -> None:
        try:
            status_code, error = self._post(due)
            attempts = due.attempts + 1
            if error is None:
                self._record(due, status="delivered", attempts=attempts,
                             status_code=status_code, error=None)
                log.info("callback delivered", job_id=due.job_id, url=due.url)
                return
            p = self.policy
            gave_up = attempts >= p.max_attempts
            delay = retry_delay_s(attempts, p.delay_s, 2.0, p.max_delay_s)
            self._record(due, status="failed" if gave_up else "pending", attempts=attempts,
                         status_code=status_code, error=error,
                         next_at=now_ms() + int(delay * 1000))
            log.warning("callback failed", job_id=due.job_id, url=due.url, error=error,
                        attempt=attempts, gave_up=gave_up)
        except Exception as exc:  # never let a delivery thread die silently
            log.error("callback error", job_id=due.job_id, error=str(exc))
        finally:
            with self.lock:
                self.busy.discard(due.id)


def callback_rows(ended: dict[str, int], hashes: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Outbox rows for the jobs that ended in a batch (job id → terminal seq) and asked for
    a callback in their spec (read from the job hash; a job mirrored only after its hash
    expired gets none)."""
    now = now_ms()
    rows = []
    for job_id, seq in ended.items():
        spec = hashes.get(job_id, {}).get("spec") or ""
        if "callback_url" not in spec:
            continue
        url = orjson.loads(spec).get("callback_url")
        if url:
            rows.append({"job_id": job_id, "seq": seq, "url": str(url), "status": "pending",
                         "attempts": 0, "next_at": now, "claimed_until": 0, "updated_at": now})
    return rows
