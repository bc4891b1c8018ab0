"""common/keys.py owns every key name: nothing else in the code spells the prefix or a
key pattern, and every Lua script receives its keys in KEYS (never builds one)."""

from __future__ import annotations

import re
from pathlib import Path

from common.keys import Keys
from common.scripts import SCRIPT_NAMES, source

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "scheduler", "worker", "cli", "common")
KEY_SPELLING = re.compile(r"\{tidal\}|[\"'`]:(job|queue|dispatch|log|logs|worker|host|hostwait|"
                          r"deps|dependents|idem|user|delayed|events|submissions):")


def test_no_module_but_keys_py_spells_a_key() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name == "keys.py" and path.parent.name == "common":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_SPELLING.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_lua_scripts_never_build_key_names() -> None:
    for name in SCRIPT_NAMES:
        body = (REPO / "common" / "lua" / f"{name}.lua").read_text()
        code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))
        # concatenation is only allowed for the pub/sub channel (channels are not keys)
        for line in code.splitlines():
            if ".." in line:
                assert "PUBLISH" in line, f"{name}.lua builds a string: {line.strip()}"


def test_every_script_loads_with_its_library() -> None:
    for name in SCRIPT_NAMES:
        assert "local function emit" in source(name)


def test_keys_share_one_cluster_slot() -> None:
    k = Keys("{tidal}")
    names = [k.job("x"), k.queue("q"), k.dispatch("q"), k.events(), k.worker("w"), k.delayed(),
             k.submissions(), k.log("x"), k.idem("u", "k"), k.host("h")]
    assert all(n.startswith("{tidal}:") for n in names)
    assert len(set(names)) == len(names)
