"""`tidal scheduler`: wire settings, logging and signals around the scheduler loop."""

from __future__ import annotations

import signal
from types import FrameType

from common.logging import configure_logging
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
