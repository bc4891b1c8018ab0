"""Bearer-token authentication. The admin token comes from the settings (TIDAL_TOKEN);
every other token is stored as its SHA-256 in the `tokens` table and looked up there.
Positive look-ups are cached in-process for a few seconds, so a revoked token may still
work for up to `CACHE_TTL_S`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from common.auth import hash_token, same_token
from common.clock import monotonic
from common.errors import Forbidden, Unauthorized
from common.settings import Settings
from common.tables import ApiToken

CACHE_TTL_S = 10.0
ADMIN_USER = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling."""

    user: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.user

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden("this needs an admin token")


ADMIN = Principal(ADMIN_USER, admin=True)


class TokenCache:
    """token hash → principal, for `ttl_s` seconds (positive answers only)."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        principal, expires = hit
        if monotonic() >= expires:
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (principal, monotonic() + self.ttl_s)


def _lookup(engine: Engine, digest: str) -> Principal | None:
    with Session(engine) as session:
        row = session.get(ApiToken, digest)
        return Principal(row.user, row.admin) if row is not None else None


async def resolve_principal(
    token: str | None, settings: Settings, engine: Engine, cache: TokenCache
) -> Principal:
    """The principal a bearer token stands for, or Unauthorized."""
    if not token:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if settings.token and same_token(token, settings.token):
        return ADMIN
    digest = hash_token(token)
    principal = cache.get(digest)
    if principal is None:
        principal = await run_in_threadpool(_lookup, engine, digest)
        if principal is None:
            raise Unauthorized("invalid token")
        cache.put(digest, principal)
    return principal
