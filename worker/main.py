"""`tidal worker`: wire settings, logging and signals, then run the worker until stopped.

SIGTERM or SIGINT stops reading and gives running jobs `shutdown_grace_s`; a second signal
ends the grace period at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from common.logging import configure_logging, get_logger
from common.settings import Settings
from worker.service import Worker


def run(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, service="worker")
    # allow-listed python job modules are found in the working directory too (after
    # everything else, so nothing there shadows an installed module)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    worker = Worker(settings)
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        # Locks are not safe in a signal handler (the interrupted code may hold them):
        # let a short-lived thread do the stopping.
        threading.Thread(target=worker.stop, kwargs={"force": signals > 1}, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker.abandoned:
        # python jobs still running in threads cannot be stopped, and the interpreter
        # would wait for them at exit: their attempts are already finished in Redis.
        get_logger("tidal.worker").warning("exiting with python jobs still running",
                                           jobs=worker.abandoned)
        os._exit(0)
