"""FastAPI dependencies as `Annotated` aliases. Everything comes from `app.state`, set up
by `api.app.create_app` (settings) and its lifespan (clients), so a test builds an app
with its own Settings and gets its own clients.

Every dependency here is `async def` although none awaits anything: FastAPI runs a plain
`def` dependency in the thread pool, a thread hop (two wake-ups) per request for what is
an attribute read (docs/performance.md, "API")."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.engine import Engine

from api.auth import Principal, TokenCache, resolve_principal
from common.keys import Keys
from common.scripts import Scripts
from common.settings import Settings


@dataclass
class AppState:
    """What the lifespan opens once per process."""

    settings: Settings
    redis: aredis.Redis
    scripts: Scripts
    keys: Keys
    engine: Engine
    tokens: TokenCache = field(default_factory=TokenCache)
    # set when the server begins to stop, so long-lived streams (SSE) end promptly
    stopping: threading.Event = field(default_factory=threading.Event)


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tidal
    return state


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_redis(state: StateDep) -> aredis.Redis:
    return state.redis


async def get_scripts(state: StateDep) -> Scripts:
    return state.scripts


async def get_keys(state: StateDep) -> Keys:
    return state.keys


async def get_engine(state: StateDep) -> Engine:
    return state.engine


RedisDep = Annotated[aredis.Redis, Depends(get_redis)]
ScriptsDep = Annotated[Scripts, Depends(get_scripts)]
KeysDep = Annotated[Keys, Depends(get_keys)]
EngineDep = Annotated[Engine, Depends(get_engine)]

bearer = HTTPBearer(
    auto_error=False,
    description="The admin token (TIDAL_TOKEN) or a user token from POST /tokens.",
)


async def get_principal(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    token = credentials.credentials if credentials else None
    return await resolve_principal(token, state.settings, state.engine, state.tokens)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, as HTTPBearer reads it
    (None when there is none, or another scheme)."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    return token if token and scheme.lower() == "bearer" else None


async def request_principal(request: Request) -> tuple[AppState, Principal]:
    """(state, principal) for the hot routes (POST /jobs, GET /jobs/{id}), which take
    only the request: FastAPI's dependency solving of StateDep and PrincipalDep (three
    dependencies, a security scheme) costs more per request than the work it wraps.
    Same checks and errors as PrincipalDep; the routes declare BEARER_SECURITY for the
    OpenAPI document."""
    state: AppState = request.app.state.tidal
    token = bearer_token(request)
    return state, await resolve_principal(token, state.settings, state.engine, state.tokens)


# what a route that authenticates by request_principal declares in `openapi_extra`
BEARER_SECURITY: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
# One dependency (the request its only parameter): resolved before the route's query
# parameters are validated, as PrincipalDep is, so a caller without a valid token gets
# 401 before any 422.
CallerDep = Annotated[tuple[AppState, Principal], Depends(request_principal)]


async def get_admin(principal: PrincipalDep) -> Principal:
    principal.require_admin()
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
