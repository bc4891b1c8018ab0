"""The worker's isolation settings: read from TIDAL_* and documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.options import WorkerOptions

REPO = Path(__file__).resolve().parents[2]


def test_every_option_is_documented() -> None:
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [n for n in (f"TIDAL_{f.upper()}" for f in WorkerOptions.model_fields)
               if f"`{n}`" not in doc]
    assert missing == []


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDAL_PYTHON_ISOLATION", "process")
    monkeypatch.setenv("TIDAL_JOB_PIDS_MAX", "0")
    options = WorkerOptions()
    assert (options.python_isolation, options.job_pids_max) == ("process", 0)
    assert WorkerOptions(log_max_bytes=2048).log_tail_bytes == 64 * 1024
