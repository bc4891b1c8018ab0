"""The dashboard: one page at `/` with its script and stylesheet (api/dashboard/). The
files hold no data, so they are served without a token; the page asks for one and then
calls the REST API and the WebSocket like any client (docs/dashboard.md)."""

from __future__ import annotations

import re
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import error_response

router = APIRouter(include_in_schema=False)

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_FILES = {name: (files("api") / "dashboard" / name).read_bytes() for name in _TYPES}


def _serve(name: str, request: Request) -> Response:
    host = request.headers.get("host", "")
    # the page's own origin only: its script and style, fetch and the WebSocket to here
    # (older browsers do not count ws: as 'self', so the host is named; a Host header
    # that is not a plain host[:port] is left out rather than copied into the policy)
    sockets = f" ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return Response(_FILES[name], media_type=_TYPES[name], headers={
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    })


@router.get("/", response_model=None)
async def dashboard(request: Request) -> Response:
    return _serve("index.html", request)


@router.get("/dashboard/{name}", response_model=None)
async def dashboard_file(name: str, request: Request) -> Response:
    if name not in _FILES or name == "index.html":
        return error_response(404, "not_found", f"no dashboard file {name!r}")
    return _serve(name, request)
