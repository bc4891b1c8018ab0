"""The API against bad input (RELIABILITY.md §4) and plain HTTP semantics: status codes,
auth, and the error envelope on every failure. The app talks to the session's real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.exceptions import ResponseError
from sqlmodel import Session, delete
from starlette.requests import Request

from api import auth
from api import body as api_body
from api.app import create_app
from api.errors import PayloadTooLarge, redis_unavailable
from common.db import make_engine
from common.jobs import new_job_id
from common.settings import Settings
from common.tables import ApiToken
from common.valkey import free_port

ADMIN = {"Authorization": "Bearer admintoken"}
JSON = {"Content-Type": "application/json"}
LIMIT = 256 * 1024


def api_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"token": "admintoken", "max_body_bytes": LIMIT,
                                       "max_batch": 5, **update})


@pytest.fixture
def app(settings: Settings, r: redis.Redis) -> FastAPI:
    return create_app(api_settings(settings))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=ADMIN) as c:
        yield c


def error_of(resp: Any, status: int, code: str) -> dict[str, Any]:
    """Assert the envelope shape, status and code; return the inner error."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def bearer(client: TestClient, user: str) -> dict[str, str]:
    """Headers with a fresh token for `user`, minted by the admin."""
    resp = client.post("/tokens", json={"user": user})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def post_raw(client: TestClient, raw: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post("/jobs", content=raw, headers=headers or JSON)


# -- content type and size ------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_wrong_content_type_is_415(client: TestClient, ctype: str) -> None:
    resp = post_raw(client, b'{"command": ["true"]}', {"Content-Type": ctype})
    error_of(resp, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    ctype = {"Content-Type": "application/json; charset=utf-8"}
    resp = post_raw(client, b'{"command": ["true"]}', ctype)
    assert resp.status_code == 202, resp.text


def test_body_over_limit_by_content_length_is_413(client: TestClient) -> None:
    raw = b'{"command": ["' + b"x" * LIMIT + b'"]}'
    err = error_of(post_raw(client, raw), 413, "payload_too_large")
    assert str(LIMIT) in err["message"]


def test_streamed_body_over_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"command": ["'
        for _ in range(LIMIT // 512 + 2):
            yield b"x" * 512
        yield b'"]}'

    resp = client.post("/jobs", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    err = error_of(resp, 413, "payload_too_large")
    assert str(LIMIT) in err["message"]


def _request(headers: dict[str, str], chunks: list[bytes]) -> tuple[Request, list[int]]:
    received: list[int] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        more = len(received) < len(chunks)
        return {"type": "http.request", "body": chunks[len(received) - 1], "more_body": more}

    scope = {
        "type": "http", "method": "POST", "path": "/jobs", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), received


def test_declared_length_is_refused_before_reading() -> None:
    request, received = _request({**JSON, "Content-Length": str(10**9)}, [b"{}"])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(api_body.read_body(request, LIMIT))
    assert received == []  # not one byte read


def test_streamed_count_stops_reading_at_the_limit() -> None:
    chunks = [b"x" * 1024] * (LIMIT // 1024 * 2)  # twice the limit, no header
    request, received = _request(JSON, chunks)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(api_body.read_body(request, LIMIT))
    assert len(received) == LIMIT // 1024 + 1  # stopped right after crossing the limit


# -- JSON that must not get in --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"command": ',  # truncated
        b"",  # empty
        b'{"command": ["true"], "kwargs": {"x": NaN}}',
        b'{"command": ["true"], "kwargs": {"x": Infinity}}',
        b'{"command": ["\\ud800"]}',  # lone surrogate escape
        b'{"command": ["true"], "args": [1' + b"0" * 5000 + b"]}",  # 5000-digit integer
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    ],
    ids=["truncated", "empty", "nan", "infinity", "lone-surrogate", "huge-int", "deep"],
)
def test_invalid_json_is_422_json_invalid(client: TestClient, raw: bytes) -> None:
    error_of(post_raw(client, raw), 422, "json_invalid")


def _validation(client: TestClient, payload: Any) -> dict[str, Any]:
    return error_of(client.post("/jobs", json=payload), 422, "validation_error")


def test_nul_in_argv_is_422(client: TestClient) -> None:
    err = _validation(client, {"command": ["echo", "a\x00b"]})
    assert err["message"].startswith("command[1]: must not contain NUL"), err
    assert err["details"][0]["loc"] == ["body", "command", 1]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"command": "true", "env": {"A": "x\x00"}}, "env.A"),
        ({"command": "true", "cwd": "/tmp\x00"}, "cwd"),
        ({"command": "true", "tags": {"team": "a\x00"}}, "tags.team"),
    ],
)
def test_nul_elsewhere_is_422(client: TestClient, payload: dict[str, Any], field: str) -> None:
    assert _validation(client, payload)["message"].startswith(f"{field}: ")


def test_unknown_field_is_named(client: TestClient) -> None:
    err = _validation(client, {"command": ["true"], "comand": "typo"})
    assert err["message"] == "comand: Extra inputs are not permitted"
    assert err["details"] == [
        {"loc": ["body", "comand"], "msg": "Extra inputs are not permitted",
         "type": "extra_forbidden"}
    ]


def test_bad_priority_names_the_choices(client: TestClient) -> None:
    err = _validation(client, {"command": ["true"], "priority": "urgent"})
    assert err["message"].startswith("priority: Input should be 'critical', 'high'"), err


@pytest.mark.parametrize("queue", ["a b", "{tidal}", "q:1", "", "ü"])
def test_bad_queue_name_is_422(client: TestClient, queue: str) -> None:
    assert _validation(client, {"command": ["true"], "queue": queue})["message"].startswith(
        "queue: "
    )


def test_missing_command_is_422(client: TestClient) -> None:
    assert "command" in _validation(client, {"priority": "high"})["message"]


def test_bounds_are_checked(client: TestClient) -> None:
    assert _validation(client, {"command": "x", "timeout": 0})["message"].startswith("timeout:")
    assert _validation(client, {"command": "x", "retries": 10**6})["message"].startswith(
        "retries:"
    )


def test_body_must_be_object_or_array(client: TestClient) -> None:
    err = error_of(post_raw(client, b'"just a string"'), 422, "validation_error")
    assert "array" in err["message"]


def test_empty_batch_is_422(client: TestClient) -> None:
    err = _validation(client, [])
    assert "at least one job" in err["message"]


def test_batch_over_max_is_422(client: TestClient) -> None:
    err = _validation(client, [{"command": "true"}] * 6)
    assert "at most 5" in err["message"]


def test_batch_errors_carry_the_index(client: TestClient) -> None:
    err = _validation(client, [{"command": "true"}, {"command": "x", "priority": "nope"}])
    assert err["message"].startswith("[1].priority: ")
    assert err["details"][0]["loc"] == ["body", 1, "priority"]


def test_rejected_batch_writes_nothing(client: TestClient, r: redis.Redis, settings: Settings
                                       ) -> None:
    _validation(client, [{"command": "true"}, {"command": "true", "queue": "a b"}])
    assert r.xlen(f"{settings.prefix}:submissions") == 0


def test_query_validation_uses_the_envelope(client: TestClient) -> None:
    err = error_of(client.get("/jobs", params={"limit": 0}), 422, "validation_error")
    assert err["message"].startswith("query.limit: ")
    error_of(client.get("/jobs", params={"cursor": "not-an-id"}), 422, "validation_error")
    error_of(client.get("/jobs", params={"state": "sleeping"}), 422, "validation_error")


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWRtaW46YWRtaW4="},
     {"Authorization": "Bearer"}],
    ids=["none", "wrong", "basic", "empty"],
)
def test_without_a_valid_token_is_401(app: FastAPI, headers: dict[str, str]) -> None:
    with TestClient(app) as anon:
        for resp in (anon.get("/jobs", headers=headers),
                     anon.post("/jobs", json={"command": "true"}, headers=headers),
                     anon.get("/workers", headers=headers)):
            error_of(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"


def test_open_endpoints_need_no_token(app: FastAPI) -> None:
    with TestClient(app) as anon:
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert anon.get(path).status_code == 200, path


def test_user_token_cannot_mint_tokens(client: TestClient) -> None:
    alice = bearer(client, "alice")
    resp = client.post("/tokens", json={"user": "bob"}, headers=alice)
    error_of(resp, 403, "forbidden")


def test_token_body_is_validated(client: TestClient) -> None:
    error_of(client.post("/tokens", json={"user": "a b"}), 422, "validation_error")
    error_of(client.post("/tokens", json={"user": "a", "root": True}), 422, "validation_error")
    error_of(client.post("/tokens", content=b"user=a"), 415, "unsupported_media_type")
    error_of(client.post("/tokens", json={"user": "admin"}), 422, "invalid_submission")
    assert client.post("/tokens", json={"user": "admin", "admin": True}).status_code == 201


def test_token_body_is_not_read_before_auth(app: FastAPI) -> None:
    with TestClient(app) as anon:
        resp = anon.post("/tokens", content=b"{" * (10 * LIMIT), headers=JSON)
        error_of(resp, 401, "unauthorized")


# -- not found, other user's job, methods ------------------------------------------------------


@pytest.mark.parametrize("job_id", [new_job_id(), "nope", "X" * 26, "../../etc/passwd"])
def test_unknown_job_is_404(client: TestClient, job_id: str) -> None:
    for resp in (client.get(f"/jobs/{job_id}"), client.delete(f"/jobs/{job_id}"),
                 client.get(f"/jobs/{job_id}/logs")):
        error_of(resp, 404, "not_found")


def test_other_users_job_is_404(client: TestClient) -> None:
    alice, bob = bearer(client, "alice"), bearer(client, "bob")
    job_id = client.post("/jobs", json={"command": "true"}, headers=alice).json()["id"]
    assert client.get(f"/jobs/{job_id}", headers=alice).status_code == 200
    for resp in (client.get(f"/jobs/{job_id}", headers=bob),
                 client.delete(f"/jobs/{job_id}", headers=bob),
                 client.get(f"/jobs/{job_id}/logs", headers=bob)):
        err = error_of(resp, 404, "not_found")
        assert err["message"] == f"job {job_id} not found"
    assert client.get(f"/jobs/{job_id}").json()["state"] == "pending"  # bob changed nothing


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    error_of(client.get("/nowhere"), 404, "not_found")
    resp = client.put("/jobs")
    error_of(resp, 405, "method_not_allowed")
    assert "allow" in resp.headers


# -- server-side failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, down",
    [
        (ResponseError("MISCONF Errors writing to the AOF file: No space left on device"), True),
        (ResponseError("LOADING Redis is loading the dataset in memory"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.BusyLoadingError("loading"), True),
        (redis.exceptions.ConnectionError("refused"), True),
        (redis.exceptions.TimeoutError("timed out"), True),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    ],
)
def test_redis_unavailable_classification(exc: Exception, down: bool) -> None:
    assert redis_unavailable(exc) is down


def test_redis_faults_are_503_and_bugs_are_500(app: FastAPI) -> None:
    async def misconf() -> None:
        raise ResponseError("MISCONF Errors writing to the AOF file: No space left on device")

    async def bug() -> None:
        raise RuntimeError("a bug")

    async def wrongtype() -> None:
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    app.add_api_route("/test/misconf", misconf)
    app.add_api_route("/test/bug", bug)
    app.add_api_route("/test/wrongtype", wrongtype)
    with TestClient(app, raise_server_exceptions=False) as c:
        err = error_of(c.get("/test/misconf"), 503, "redis_unavailable")
        assert err["message"].startswith("Redis is unavailable: MISCONF")
        err = error_of(c.get("/test/bug"), 500, "internal")
        assert "a bug" not in err["message"]  # no internals leak to the client
        error_of(c.get("/test/wrongtype"), 500, "internal")


def test_redis_down_is_503(settings: Settings) -> None:
    down = api_settings(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(down), headers=ADMIN) as c:
        err = error_of(c.post("/jobs", json={"command": "true"}), 503, "redis_unavailable")
        assert err["message"].startswith("Redis is unavailable: ")
        error_of(c.get(f"/jobs/{new_job_id()}"), 503, "redis_unavailable")
        err = error_of(c.get("/healthz"), 503, "unavailable")
        assert "redis is down" in err["message"] and "database" not in err["details"]
        error_of(c.get("/readyz"), 503, "unavailable")


def test_request_id_is_echoed(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers[
        "x-request-id"
    ] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16


def test_openapi_documents_the_submission_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schema = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/JobSubmission"} in schema["oneOf"]
    assert "priority" in doc["components"]["schemas"]["JobSubmission"]["properties"]
    assert "Resources" in doc["components"]["schemas"]
    assert doc["info"]["title"] == "Tidal"


def test_token_cache_keeps_positive_answers_for_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(auth, "monotonic", lambda: now[0])
    cache = auth.TokenCache(ttl_s=10.0)
    alice = auth.Principal("alice")
    cache.put("h1", alice)
    now[0] += 9.9
    assert cache.get("h1") == alice
    now[0] += 0.2
    assert cache.get("h1") is None
    assert cache.get("unknown") is None


def test_revoked_token_stops_working_after_the_cache(client: TestClient, settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(auth, "monotonic", lambda: now[0])
    alice = bearer(client, "alice")
    assert client.get("/jobs", headers=alice).status_code == 200
    engine = make_engine(settings)
    with Session(engine) as session:
        session.exec(delete(ApiToken))  # type: ignore[call-overload]
        session.commit()
    engine.dispose()
    assert client.get("/jobs", headers=alice).status_code == 200  # cached
    now[0] += auth.CACHE_TTL_S + 1
    error_of(client.get("/jobs", headers=alice), 401, "unauthorized")
