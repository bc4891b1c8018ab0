"""`tidal scheduler`: wire settings, logging and signals around the scheduler loop."""

from __future__ import annotations

import signal
from types import FrameType

from common.logging import configure_logging
from common.redis import connect
from common.settings import Settings
from scheduler.service import Scheduler


def run(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, service="scheduler")
    scheduler = Scheduler(settings)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        scheduler.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    scheduler.run()


def run_recorder(settings: Settings) -> None:
    """`tidal recorder`: the recorder alone, in its own process (then run the schedulers
    with TIDAL_RECORDER=false), so its SQL work never holds a scheduler's GIL."""
    import threading

    from scheduler.recorder import Recorder

    configure_logging(settings.log_level, settings.log_format, service="recorder")
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    Recorder(settings, connect(settings.redis_url)).run(stop)
