"""The dashboard's files: served without a token under a strict CSP, and in step with the
API they call (every endpoint the script names exists; the filters offer the real states
and priorities)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from typing import get_args

import pytest
from fastapi.testclient import TestClient

from common.models import PriorityName, State
from tests.integration.conftest import ADMIN_TOKEN


def _script(client: TestClient) -> str:
    resp = client.get("/dashboard/app.js")
    assert resp.status_code == 200
    return resp.text


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.options: dict[str, list[str]] = {}
        self._select: str | None = None
        self._in_option = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.refs.append(a["src"] or "")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.refs.append(a.get("href") or "")
        if tag == "select":
            self._select = a.get("id")
            self.options[self._select or ""] = []
        self._in_option = tag == "option"

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        self._in_option = False

    def handle_data(self, data: str) -> None:
        if self._in_option and self._select and data.strip():
            self.options[self._select].append(data.strip())


def _page(client: TestClient) -> _Page:
    resp = client.get("/", headers={"Authorization": ""})
    assert resp.status_code == 200, resp.text
    page = _Page()
    page.feed(resp.text)
    return page


def test_the_page_and_its_files_need_no_token_and_forbid_outside_sources(
    client: TestClient,
) -> None:
    resp = client.get("/", headers={"Authorization": ""})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    refs = _page(client).refs
    assert sorted(refs) == ["/dashboard/app.js", "/dashboard/style.css"]
    types = {"/dashboard/app.js": "text/javascript", "/dashboard/style.css": "text/css"}
    for ref in refs:
        got = client.get(ref, headers={"Authorization": ""})
        assert got.status_code == 200
        assert got.headers["content-type"].startswith(types[ref])
    # the data itself still needs a token
    assert client.get("/jobs", headers={"Authorization": ""}).status_code == 401


def test_an_unknown_dashboard_file_is_a_404_with_the_error_body(client: TestClient) -> None:
    for name in ("nope.js", "index.html", "..%2Fapp.py"):
        resp = client.get(f"/dashboard/{name}")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"


def test_a_hostile_host_header_is_not_copied_into_the_policy(client: TestClient) -> None:
    csp = client.get("/", headers={"Host": "evil; script-src *"}).headers[
        "content-security-policy"]
    assert "evil" not in csp and "script-src 'self'" in csp
    csp = client.get("/", headers={"Host": "127.0.0.1:8123"}).headers["content-security-policy"]
    assert "ws://127.0.0.1:8123" in csp


def test_every_endpoint_the_script_calls_exists(client: TestClient) -> None:
    block = re.search(r"const PATHS = \{(.*?)\};", _script(client), re.S)
    assert block is not None
    paths = dict(re.findall(r'(\w+):\s*"([^"]+)"', block.group(1)))
    assert {"jobs", "job", "queues", "workers", "retry", "ws"} <= set(paths)
    api_paths = set(client.get("/openapi.json").json()["paths"])
    for name, path in paths.items():
        if name != "ws":
            assert path.replace("{id}", "{job_id}") in api_paths, f"{name}: {path} is not a route"
    # the WebSocket, as the page opens it: the token in the query
    with client.websocket_connect(f"{paths['ws']}?token={ADMIN_TOKEN}") as ws:
        ws.send_json({"cmd": "reconnect_job", "id": "0" * 26, "after": None, "batch": True})
        assert ws.receive_json()["error"]["code"] == "not_found"


def test_the_filters_offer_the_real_states_and_priorities(client: TestClient) -> None:
    options = _page(client).options
    assert options["state-filter"][1:] == [s.value for s in State]
    assert sorted(options["submit-priority"]) == sorted(get_args(PriorityName))


@pytest.mark.skipif(shutil.which("node") is None, reason="node checks the script's syntax")
def test_the_script_parses(client: TestClient) -> None:
    out = subprocess.run(["node", "--check", "-"], input=_script(client), text=True,
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
