"""Cron: fire every schedule whose tick has come, exactly once per tick even with several
schedulers. The tick's job is submitted with the idempotency key (schedule, tick), then
the schedule moves to its next tick with a compare-and-set; a scheduler that dies in
between leaves the tick to fire again into the same job. A tick missed while every
scheduler was down fires once on return (the next tick is computed from now)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from common import scripts as sc
from common.cron import Schedule, next_fire_ms
from common.jobs import new_job_id, submission_fields
from common.logging import get_logger
from scheduler.context import Context

log = get_logger("scheduler")


@dataclass
class CronFirer:
    ctx: Context

    def fire_due(self) -> int:
        c = self.ctx
        now = c.redis_now_ms()
        due = c.client.zrangebyscore(c.keys.cron(), "-inf", now, start=0, num=50,
                                     withscores=True)
        return sum(self.fire(name, int(score), now) for name, score in due)

    def fire(self, name: str, fired_ms: int, now_ms: int) -> int:
        c = self.ctx
        raw = c.client.hget(c.keys.cron_specs(), name)
        if raw is None:  # removed meanwhile
            c.client.zrem(c.keys.cron(), name)
            return 0
        schedule = Schedule.model_validate(orjson.loads(raw))
        job = schedule.job.model_copy(update={"idempotency_key": f"cron.{name}.{fired_ms}"})
        c.scripts.run(sc.submit(
            c.keys, new_job_id(), schedule.owner,
            {**submission_fields(job, c.settings.stale_after_s), "cron": name},
            events_maxlen=c.maxlen, idempotency_key=job.idempotency_key,
        ))
        moved = c.scripts.run(sc.cron_advance(c.keys, name, fired_ms,
                                              next_fire_ms(schedule.cron, now_ms)))
        if moved:
            log.info("cron fired", schedule=name, tick=fired_ms)
        return int(moved)
