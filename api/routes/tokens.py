"""/tokens: an admin mints a token for a user (shown once; only its hash is stored)."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.auth import ADMIN_USER
from api.body import json_body, read_model
from api.deps import AdminDep, StateDep
from api.routes.jobs import error_docs
from common.auth import generate_token, hash_token
from common.clock import now_ms
from common.errors import InvalidSubmission
from common.models import TokenCreate, TokenCreated
from common.tables import ApiToken

log = structlog.get_logger("api")
router = APIRouter(prefix="/tokens", tags=["tokens"])
MAX_BODY_BYTES = 64 * 1024


def _store(engine: Engine, row: ApiToken) -> None:
    with Session(engine) as session:
        session.add(row)
        session.commit()


@router.post(
    "",
    status_code=201,
    response_model=TokenCreated,
    summary="Create a user token (admin only)",
    responses=error_docs(401, 403, 413, 415, 422, 503),
    openapi_extra=json_body(TokenCreate),
)
async def create_token(request: Request, ctx: StateDep, admin: AdminDep) -> TokenCreated:
    # read after the admin check (a body parameter would be read before any dependency)
    body = await read_model(request, TokenCreate, max_bytes=MAX_BODY_BYTES)
    if body.user == ADMIN_USER and not body.admin:  # would see the admin token's jobs
        raise InvalidSubmission(f"user {ADMIN_USER!r} is reserved for admin tokens")
    token = generate_token()
    row = ApiToken(hash=hash_token(token), user=body.user, admin=body.admin, created_at=now_ms())
    await run_in_threadpool(_store, ctx.engine, row)
    log.info("token_created", user=body.user, admin=body.admin, by=admin.user)
    return TokenCreated(user=body.user, admin=body.admin, token=token)
