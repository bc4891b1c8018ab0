"""WebSocket /ws: submit and watch jobs on one connection.

Authentication at the handshake: `?token=<token>` or `Authorization: Bearer <token>`; a
missing or wrong token is refused with 401 and the error envelope. A user attaches only
to their own jobs (another user's job answers `not_found`); an admin to any.

Commands (JSON text frames):

    {"cmd": "run_job", "job": {<submission>}}           submit, then stream it
    {"cmd": "reconnect_job", "id": "<job id>", "after": "<log entry id>" | null}
    {"cmd": "cancel_job", "id": "<job id>"}

run_job and reconnect_job take `"batch": true` (optional): each read's output lines then
come as ONE `lines` message (each line with its own id) instead of a `line` message each.

Pushes:

    {"type": "accepted", "job": {<job document>}}            run_job took the job
    {"type": "following", "job_id": "...", "after": ...}      reconnect_job attached
    {"type": "state", "job_id": "...", "state": "running", "seq": "3", "attempt": "1", ...}
    {"type": "line", "job_id": "...", "id": "<entry id>", "stream": "stdout", "time": "...",
     "text": "..."}
    {"type": "lines", "job_id": "...", "lines": [{"id": "<entry id>", "stream": "stdout",
     "time": "...", "text": "..."}, ...]}                     (instead, with batch)
    {"type": "progress", "job_id": "...", "id": "<entry id>", "time": "...", "percent": 40.0,
     "stage": "compiling", "message": null}
    {"type": "end", "job": {<final job document>}}
    {"type": "cancelling", "job": {<job document>}}           cancel_job was accepted
    {"type": "error", "cmd": "...", "job_id": ..., "error": {"code", "message", "details"}}

Lines come from the same reader as the SSE follow (`api.routes.logs.tail`), so a client
that reconnects with the id of the last line it got receives exactly the lines it missed.
A job keeps running when its client disconnects; several jobs may be followed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import aclosing
from typing import Annotated, Any, Literal

import orjson
import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from redis.exceptions import RedisError
from starlette.websockets import WebSocketState

from api import errors
from api.auth import Principal, resolve_principal
from api.deps import AppState
from api.routes import jobs
from api.routes.logs import (
    PROGRESS,
    STREAM_ID_PATTERN,
    Ended,
    Lines,
    StateSeen,
    line_item,
    progress_data,
    tail,
)
from api.validate import check_submissions
from api.watch import Entry
from common.clock import ms_to_iso
from common.errors import LimitExceeded, TidalError
from common.models import JobSubmission
from common.tables import LOG_STREAM_NAMES

log = structlog.get_logger("api")
router = APIRouter()

MAX_FOLLOWS = 32  # jobs followed at once on one connection


class RunJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd: Literal["run_job"]
    job: dict[str, Any]
    batch: bool = False


class ReconnectJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd: Literal["reconnect_job"]
    id: str
    after: Annotated[str, Field(pattern=STREAM_ID_PATTERN)] | None = None
    batch: bool = False


class CancelJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd: Literal["cancel_job"]
    id: str


Command = Annotated[RunJob | ReconnectJob | CancelJob, Field(discriminator="cmd")]
_commands: TypeAdapter[RunJob | ReconnectJob | CancelJob] = TypeAdapter(Command)


def _token(ws: WebSocket) -> str | None:
    if token := ws.query_params.get("token"):
        return token
    scheme, _, credentials = ws.headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def line_message(job_id: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The message of one log entry: a `line`, or a `progress` report."""
    if fields.get("s") == PROGRESS:
        return {"type": "progress", "job_id": job_id, "id": entry_id,
                **progress_data(entry_id, fields)}
    t = fields.get("t", "")
    return {
        "type": "line", "job_id": job_id, "id": entry_id,
        "stream": LOG_STREAM_NAMES.get(fields.get("s", ""), "system"),
        "time": ms_to_iso(int(t) if t.isdigit() else int(entry_id.split("-", 1)[0])),
        "text": fields.get("l", ""),
    }


class Invalid(TidalError):
    code = "validation_error"
    status = 422


def _validation(exc: ValidationError, prefix: tuple[str, ...] = ()) -> Invalid:
    details = errors.clean_errors(
        exc.errors(include_url=False, include_input=False, include_context=False), prefix)
    return Invalid(errors.validation_message(details), details)


class Connection:
    """One client: its commands, and a task per job it follows, all sending through one
    lock (one frame at a time)."""

    def __init__(self, ws: WebSocket, ctx: AppState, principal: Principal) -> None:
        self.ws, self.ctx, self.principal = ws, ctx, principal
        self.lock = asyncio.Lock()
        self.follows: dict[str, asyncio.Task[None]] = {}

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_text(orjson.dumps(message).decode())

    async def send_error(self, exc: TidalError, cmd: str | None = None,
                         job_id: str | None = None) -> None:
        await self.send({"type": "error", "cmd": cmd, "job_id": job_id,
                         "error": {"code": exc.code, "message": exc.message,
                                   "details": exc.details}})

    # -- commands -----------------------------------------------------------------------

    async def handle(self, raw: str | bytes) -> None:
        cmd: str | None = None
        try:
            if len(raw) > self.ctx.settings.max_body_bytes:
                raise errors.PayloadTooLarge(
                    f"message is over the limit of {self.ctx.settings.max_body_bytes} bytes")
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise errors.JsonInvalid(f"Invalid JSON: {exc}", {"pos": exc.pos}) from None
            cmd = data.get("cmd") if isinstance(data, dict) else None
            try:
                command = _commands.validate_python(data)
            except ValidationError as exc:
                raise _validation(exc) from None
            await self._run(command)
        except TidalError as exc:
            await self.send_error(exc, cmd)
        except RedisError as exc:
            if not errors.redis_unavailable(exc):
                raise
            await self.send_error(errors.ServiceUnavailable(f"Redis is unavailable: {exc}"), cmd)

    async def _run(self, command: RunJob | ReconnectJob | CancelJob) -> None:
        if isinstance(command, RunJob):
            try:
                sub = JobSubmission.model_validate(command.job)
            except ValidationError as exc:
                raise _validation(exc, ("job",)) from None
            self._room()
            await check_submissions(self.ctx, self.principal, [sub], False)
            [job] = await jobs.submit_all(self.ctx, self.principal.user, [sub])
            await self.send({"type": "accepted", "job": job.model_dump(mode="json")})
            self._follow(job.id, "0-0", command.batch)
        elif isinstance(command, ReconnectJob):
            await jobs.visible_job(self.ctx, self.principal, command.id)
            if command.id not in self.follows:
                self._room()
            await self.send({"type": "following", "job_id": command.id, "after": command.after})
            self._follow(command.id, command.after or "0-0", command.batch)
        else:
            job = await jobs.cancel_job(command.id, self.ctx, self.principal)
            await self.send({"type": "cancelling", "job": job.model_dump(mode="json")})

    def _room(self) -> None:
        if len(self.follows) >= MAX_FOLLOWS:
            raise LimitExceeded(f"at most {MAX_FOLLOWS} jobs are followed on one connection",
                                {"limit": MAX_FOLLOWS})

    # -- following ------------------------------------------------------------------------

    def _follow(self, job_id: str, after: str, batch: bool = False) -> None:
        """Follow the job in a task of its own (replacing an earlier follow of it)."""
        earlier = self.follows.pop(job_id, None)
        if earlier is not None:
            earlier.cancel()
        self.follows[job_id] = asyncio.create_task(self._stream(job_id, after, batch))

    async def _send_lines(self, job_id: str, entries: list[Entry], batch: bool) -> None:
        """A read's entries: a message each, or with `batch` one `lines` message per run
        of output lines (progress reports keep their own messages, in order)."""
        if not batch:
            for entry_id, fields in entries:
                await self.send(line_message(job_id, entry_id, fields))
            return
        run: list[dict[str, str]] = []
        for entry_id, fields in entries:
            if fields.get("s") == PROGRESS:
                if run:
                    await self.send({"type": "lines", "job_id": job_id, "lines": run})
                    run = []
                await self.send(line_message(job_id, entry_id, fields))
            else:
                run.append(line_item(entry_id, fields))
        if run:
            await self.send({"type": "lines", "job_id": job_id, "lines": run})

    async def _stream(self, job_id: str, after: str, batch: bool = False) -> None:
        async def gone() -> bool:
            return False  # the task is cancelled when the client leaves

        try:
            async with aclosing(tail(self.ctx, job_id, after, gone)) as items:
                async for item in items:
                    if isinstance(item, Lines):
                        await self._send_lines(job_id, item.entries, batch)
                    elif isinstance(item, StateSeen):
                        await self.send({"type": "state", "job_id": job_id, **item.fields})
                    elif isinstance(item, Ended):
                        doc = item.job.model_dump(mode="json") if item.job else {"id": job_id}
                        await self.send({"type": "end", "job": doc})
                        return
            await self.send_error(errors.ServiceUnavailable(
                "the server is stopping: reconnect and send reconnect_job"), job_id=job_id)
        except RedisError as exc:
            await self.send_error(errors.ServiceUnavailable(f"Redis is unavailable: {exc}"),
                                  "reconnect_job", job_id)
        finally:
            if self.follows.get(job_id) is asyncio.current_task():
                del self.follows[job_id]

    async def close(self) -> None:
        """The client left: stop following (the jobs themselves keep running)."""
        tasks = list(self.follows.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _deny(ws: WebSocket, exc: TidalError) -> None:
    """Refuse the handshake with the error envelope (close code 1008 where the server
    cannot send an HTTP answer to a WebSocket request)."""
    response = errors.error_response(exc.status, exc.code, exc.message, exc.details,
                                     errors.BEARER)
    try:
        await ws.send_denial_response(response)
    except RuntimeError:
        await ws.close(code=1008, reason=exc.message[:120])


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    ctx: AppState = ws.app.state.tidal
    try:
        principal = await resolve_principal(_token(ws), ctx.settings, ctx.engine, ctx.tokens)
    except TidalError as exc:
        await _deny(ws, exc)
        return
    await ws.accept()
    conn = Connection(ws, ctx, principal)
    log.info("ws_open", user=principal.user)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text") if message.get("text") is not None else message.get("bytes")
            await conn.handle(raw or b"")
    except WebSocketDisconnect:
        pass
    finally:
        await conn.close()
        log.info("ws_closed", user=principal.user)
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError):
                await ws.close()
