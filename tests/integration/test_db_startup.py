"""Two services creating the SQL mirror of a fresh data dir at the same instant (the API
and the scheduler start together under `tidal up` and in docker-compose)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from common.settings import Settings


def _create(data_dir: str, barrier: multiprocessing.synchronize.Barrier,
            out: multiprocessing.Queue[str]) -> None:
    from common.db import make_engine

    settings = Settings(data_dir=Path(data_dir))
    barrier.wait()
    try:
        make_engine(settings).dispose()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(f"{type(exc).__name__}: {exc}"[:300])


@pytest.mark.parametrize("trial", range(4))
def test_two_processes_create_the_mirror_at_once(tmp_path: Path, trial: int) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [out.get(timeout=5) for _ in procs] == ["ok", "ok"]
