"""`tidal api`: configure logging and serve the app with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn

from api.app import create_app
from common.logging import configure_logging
from common.settings import Settings

# Requests still running this long after SIGTERM are cancelled.
SHUTDOWN_GRACE_S = 10


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app that it is stopping: SSE followers then
    close within a second (clients resume with Last-Event-ID) instead of holding the
    graceful shutdown until its timeout."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its graceful shutdown, so the process
        # would die of SIGTERM (-15). A clean stop exits 0, as the scheduler and the
        # workers do; `tidal up` treats any other exit as a crash.
        self._captured_signals.clear()


def run(settings: Settings) -> None:
    """Serve the API on settings.api_host:settings.api_port (blocks; SIGTERM and SIGINT
    stop it gracefully). Access lines come from the app's own structlog middleware."""
    configure_logging(settings.log_level, settings.log_format, service="api")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # uvicorn's loggers propagate to the root handler set up above
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        lifespan="on",
    )
    _Server(config, app.state.stopping).run()
