"""The FastAPI application: `create_app(settings)` wires routes, error handlers, the
request-context middleware and a lifespan that opens one Redis client (with its script
registry) and the SQL engine per process."""

from __future__ import annotations

import gc
import os
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import structlog
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from redis.asyncio.connection import ConnectionPool
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.body import body_schemas
from api.deps import AppState
from api.routes import ROUTERS
from api.routes.health import package_version
from api.watch import close_job_watch
from api.ws import router as ws_router
from common.clock import monotonic
from common.db import make_engine
from common.keys import Keys
from common.redis import connect_async
from common.scripts import Scripts
from common.settings import Settings, get_settings

log = structlog.get_logger("api")

# Each SSE follower holds a pooled connection for up to one XREAD BLOCK (1 s).
REDIS_MAX_CONNECTIONS = 1000
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


class _HiredisPacking:
    """Mixed into the pool's connection class: commands are packed by hiredis (C), as the
    sync client of redis-py does by default, instead of the asyncio client's Python packer,
    which re-joins its growing buffer for every argument (a 1,000-job submit.lua call has
    some 18,000 arguments; docs/performance.md, "API"). The bytes sent are the same."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]  # a command name of two words ("CLIENT SETNAME") is sent as two
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a memoryview, or a type redis-py refuses: redis-py's own way
            return self._packer.pack(*args)


def pack_with_hiredis(pool: ConnectionPool) -> None:
    """Make the pool's new connections pack with hiredis (when it is installed)."""
    base = pool.connection_class
    if HIREDIS_AVAILABLE and not issubclass(base, _HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})


_frozen = False


def freeze_startup_objects() -> None:
    """Once per process: move what start-up made (modules, the app, pydantic's schemas,
    some 100,000 objects) out of the garbage collector's sight. Left in, each full
    collection walks all of them, and a batch of 1,000 jobs allocates enough to set off
    collections: measured at about a third of the API's CPU per submitted job."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.stopping.clear()
    client = connect_async(settings.redis_url)
    client.connection_pool.max_connections = REDIS_MAX_CONNECTIONS
    pack_with_hiredis(client.connection_pool)
    engine = await run_in_threadpool(make_engine, settings)
    app.state.tidal = AppState(
        settings=settings,
        redis=client,
        scripts=Scripts(client),
        keys=Keys(settings.prefix),
        engine=engine,
        stopping=app.state.stopping,
    )
    freeze_startup_objects()
    log.info("api_started", prefix=settings.prefix, database=engine.url.render_as_string())
    try:
        yield
    finally:
        await close_job_watch(app.state)
        await client.aclose()
        engine.dispose()
        log.info("api_stopped")


class RequestContext:
    """Pure ASGI middleware: a request id (X-Request-ID, echoed back) bound to every log
    line of the request, one access-log line per request, and the 500 envelope for any
    exception no handler took (logged once, not re-raised to the server)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope["headers"]
                      if name == b"x-request-id"), "")
        request_id = given if _REQUEST_ID.match(given) else os.urandom(8).hex()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        t0 = monotonic()
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                await self._fail(scope, receive, send_with_id, exc, started)
            finally:
                log.info(
                    "request", method=scope["method"], path=scope["path"], status=status,
                    duration_ms=round((monotonic() - t0) * 1000, 1),
                )

    @staticmethod
    async def _fail(
        scope: Scope, receive: Receive, send: Send, exc: Exception, started: bool
    ) -> None:
        request = Request(scope, receive)
        if errors.redis_unavailable(exc):
            response = errors.unavailable_response(exc)
        else:
            response = await errors.internal_error(request, exc)
        if not started:  # else the client sees a cut response; nothing more can be sent
            await response(scope, receive, send)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the models of the bodies read by hand (api/body.py)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in body_schemas().items():
            components.setdefault(name, model_schema)
    return app.openapi_schema or {}


def create_app(settings: Settings | None = None) -> FastAPI:
    # FastAPIOffline: the same FastAPI app, with /docs served from the package's copy of
    # Swagger UI instead of a CDN (a dashboard machine or a build farm may be offline)
    app = FastAPIOffline(
        title="Tidal",
        version=package_version(),
        description="A distributed job runner on Redis streams. Every error is "
        '`{"error": {"code", "message", "details"}}`.',
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
        static_url="/docs-assets",
    )
    app.state.settings = settings or get_settings()
    app.state.stopping = threading.Event()  # set by api.main on SIGTERM/SIGINT
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(ws_router)
    app.add_middleware(RequestContext)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
