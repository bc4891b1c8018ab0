"""End-to-end ring: Tidal's services as real processes, driven as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from common.procs import die_with_parent

REPO = Path(__file__).resolve().parents[2]


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no TIDAL_* leaking in, config under tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDAL_")}
    env.update(XDG_CONFIG_HOME=str(tmp / "xdg"), PYTHONPATH=str(REPO), COLUMNS="200",
               TIDAL_LOG_FORMAT="json")
    env.update(extra)
    return env


def tidal_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


class Procs:
    """Processes a test started; stopped by PID (and their descendants) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path
              ) -> subprocess.Popen[str]:
        out = open(log, "w")  # noqa: SIM115 (kept open for the child's lifetime)
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=die_with_parent())
        out.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()
