"""Settings for every part, from environment variables `TIDAL_*` (pydantic-settings).

Built by the cached `get_settings()`, never at import; tests build their own `Settings`.
docs/configuration.md has the same table for users.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.keys import DEFAULT_PREFIX


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDAL_", extra="ignore")

    # where things are
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = DEFAULT_PREFIX
    data_dir: Path = Path(".tidal")
    database_url: str | None = None  # default: sqlite:///<data_dir>/tidal.db
    token: str | None = None  # the admin token (plain text, from the environment only)

    # api
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch: int = 10_000

    # scheduling
    priority_step_s: float = 300.0
    default_timeout_s: float = 3600.0
    max_timeout_s: float = 7 * 24 * 3600.0
    scheduler_block_ms: int = 20
    admit_batch: int = 500
    dispatch_batch: int = 500
    capacity_refresh_s: float = 0.25
    # dispatch beyond the free slots by this fraction of the live slots (a prefetch): a
    # worker then starts its next job without waiting for the scheduler, and priority
    # decides that many jobs earlier; 0 keeps the dispatch stream within the free slots
    dispatch_ahead: float = Field(default=0.0, ge=0.0, le=4.0)
    # a lone submission (one job, no host, no dependencies) is queued and, when a worker
    # has a free slot and it is the queue's head, dispatched by submit.lua itself: it
    # reaches a worker without a scheduler's round trip; off: the scheduler admits all
    admit_direct: bool = True
    reclaim_idle_s: float = 30.0  # a submissions/events entry pending this long is taken over
    reap_interval_s: float = 2.0
    max_deliveries: int = 3  # a job lost with its worker more often fails as poison
    recorder: bool = True  # run the recorder inside the scheduler process
    recorder_batch: int = 1000

    stale_after_s: float = 3600.0  # a job queued longer (and not asking otherwise) expires
    max_active_per_user: int = 100_000  # accepted and not finished, per user (429 above)
    max_queue_size: int = 1_000_000  # queued jobs per queue (429 above)
    overcommit: float = 1.0  # resources: the ledger may hand out capacity x this
    reserve_cpu: float = 0.0  # resources kept free on the whole cluster
    reserve_memory_mb: int = 0
    max_job_cpu: float = 256.0  # a job asking more is refused at submission (422)
    max_job_memory_mb: int = 1024 * 1024
    max_job_gpu: int = 16

    # workers
    # a worker with free slots dispatches the queue's next jobs itself, in the round trip
    # of its read (within the live capacity the scheduler publishes, in priority order);
    # off: only the scheduler dispatches
    worker_dispatch: bool = True
    heartbeat_s: float = 2.0
    worker_ttl_s: float = 10.0
    concurrency: int = 4
    queues: list[str] = Field(default_factory=lambda: ["default"])
    allow_modules: list[str] = Field(default_factory=list)
    worker_cpu: float | None = None  # resources a worker advertises (None: what it detects)
    worker_memory_mb: int | None = None
    worker_gpu: int = 0
    kill_grace_s: float = 2.0
    shutdown_grace_s: float = 30.0
    log_flush_ms: int = 50
    log_max_lines: int = 100_000
    log_line_max_bytes: int = 64 * 1024

    # history
    events_maxlen: int = 1_000_000
    job_ttl_s: int = 7 * 24 * 3600  # finished job hashes and logs stay this long in Redis

    # logging
    log_level: str = "INFO"
    log_format: str = "auto"  # auto | json | console

    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tidal.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
