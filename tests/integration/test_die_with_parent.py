"""common.procs: a valkey-server (or service) started by a process that is then SIGKILLed
does not run on after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from common.procs import die_with_parent
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]

PARENT = """
import sys, time
from pathlib import Path
from common.valkey import start_server
proc, url = start_server(Path(sys.argv[1]), aof=False)
print(proc.pid, flush=True)
time.sleep(120)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def test_a_server_goes_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "valkey")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    server_pid = 0
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        server = psutil.Process(server_pid)
        assert "valkey" in server.name()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE,
                 timeout=10, what="the orphaned server to get SIGTERM and exit")
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()
        if server_pid and psutil.pid_exists(server_pid):
            try:
                os.kill(server_pid, signal.SIGKILL)  # the test started it; only on failure
            except ProcessLookupError:
                pass


def test_not_armed_from_another_thread() -> None:
    """The signal follows the forking thread: a child started from a short-lived thread
    would be killed when that thread ends, so none is armed there."""
    assert die_with_parent() is not None
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(die_with_parent()))
    thread.start()
    thread.join()
    assert seen == [None]
