"""Bearer tokens: generated with enough entropy that a plain SHA-256 is a safe way to
store them (they are not passwords), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def generate_token() -> str:
    return "tdl_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(token: str, expected: str) -> bool:
    return hmac.compare_digest(hash_token(token), hash_token(expected))
