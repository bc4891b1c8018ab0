"""The SDK's lean HTTP/1.1 path for the JSON calls: the standard library's http.client on
one keep-alive connection per thread, answered as httpx.Response objects so the client's
handling (status, errors, JSON) is the same whichever path sent the request.

Why: building and parsing a request through httpx costs the caller about 0.55 ms of CPU on
our 2-core machine kind, http.client about 0.2 ms, and for `Client.run` of a short job that
difference is a fifth of the whole latency (bench/, docs/performance.md). httpx stays for
what needs it: streams (log follow) and injected transports (tests).

Failures are raised as the httpx exceptions the client already handles: ConnectError (no
connection made: nothing was sent), TimeoutException, and RemoteProtocolError for a
connection lost after the request went out. A keep-alive connection the server closed while
idle (uvicorn closes them after 5 s) is noticed before it is used — its socket reads as
ready while no answer is due — and replaced, so a request is never sent on it and never
retried here: whether to retry is the caller's decision (a POST may not be repeatable).
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx


class LeanHTTP:
    """Requests to one base URL (http or https) on per-thread keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        if not self.serves(base_url):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.headers = dict(headers)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @staticmethod
    def serves(base_url: str) -> bool:
        parts = urlsplit(base_url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                content: bytes | None = None, headers: dict[str, str] | None = None,
                read_timeout: float | None = None) -> httpx.Response:
        """One request; `read_timeout`: how long the answer may take (default: the
        timeout, which also bounds connecting)."""
        url = self.prefix + path + ("?" + urlencode(params) if params else "")
        sent = {**self.headers, **(headers or {})}
        conn = self._connection()
        sending = True
        try:
            # the body goes in the same write as the headers (http.client joins them)
            conn.request(method, url, body=content, headers=sent)
            sending = False
            if conn.sock is not None:
                conn.sock.settimeout(read_timeout or self.timeout)
            answer = conn.getresponse()
            data = answer.read()
        except TimeoutError as exc:
            self._drop(conn)
            kind = httpx.WriteTimeout if sending else httpx.ReadTimeout
            raise kind(f"timed out: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:  # connected: it may have gone out
            self._drop(conn)
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        if answer.will_close:
            self._drop(conn)
        response = httpx.Response(answer.status, headers=answer.getheaders(), content=data)
        if answer.status >= 400:  # error messages name the URL (building one costs, so only here)
            scheme = "https" if self.https else "http"
            response.request = httpx.Request(method, f"{scheme}://{self.host}:{self.port}{url}")
        return response

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _closed_by_peer(conn.sock):
            self._drop(conn)
            conn = None
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        if conn.sock is None:  # connect now, so a refusal is told apart from a lost answer
            try:
                conn.connect()
            except TimeoutError as exc:
                self._drop(conn)
                raise httpx.ConnectTimeout(f"timed out: {exc}") from exc
            except OSError as exc:
                self._drop(conn)
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)


def _closed_by_peer(sock: Any) -> bool:
    """An idle keep-alive socket that reads as ready has been closed (or broken) by the
    server: no answer is due on it."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)
