"""How a worker isolates and bounds its jobs. Environment variables `TIDAL_*`, like every
other setting (docs/configuration.md has the table; docs/reliability.md says why).

- `TIDAL_PYTHON_ISOLATION` (`thread`): `process` runs each python job in a child
  interpreter that can be killed, so `os._exit`, a segfault or a hang ends that job only.
- `TIDAL_JOB_PIDS_MAX` (4096): each attempt gets its own pids cgroup with at most this
  many tasks (0: none; see worker/cgroup.py for where that is possible).
- `TIDAL_JOB_CGROUP_ROOT` (found): where the per-attempt cgroups go; by default
  `<pids mount>/<the worker's own pids cgroup>/tidal`.
- `TIDAL_LOG_MAX_BYTES` (32 MiB): output stored per attempt; past it (or past
  `TIDAL_LOG_MAX_LINES` lines) output is counted, not stored, and only its tail is kept.
- `TIDAL_LOG_TAIL_BYTES` (64 KiB): how much of that tail is kept, per stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDAL_", extra="ignore")

    python_isolation: Literal["thread", "process"] = "thread"
    job_pids_max: int = Field(default=4096, ge=0)
    job_cgroup_root: Path | None = None
    log_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    log_tail_bytes: int = Field(default=64 * 1024, ge=0)
