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


CALL = re.compile(r"redis\.call\('(\w+)'\s*,\s*([^,)]+)")
KEYLESS = {"TIME", "PUBLISH"}  # TIME takes no key; a pub/sub channel is not a key
KEY_VARIABLE = re.compile(r"^(KEYS\[[^\]]+\]|[a-z_][a-z_0-9]*(\.[a-z_]+)?)$")


def test_lua_scripts_take_every_key_from_keys() -> None:
    """The key argument of every redis.call is a variable bound from KEYS (or a helper's
    parameter), never a string built inside Lua: that would break Redis Cluster."""
    for path in sorted((REPO / "common" / "lua").glob("*.lua")):
        code = "\n".join(line.split("--")[0] for line in path.read_text().splitlines())
        bound = set(re.findall(r"local\s+([\w\s,]+?)\s*=\s*KEYS", code))
        for command, arg in CALL.findall(code):
            if command in KEYLESS:
                continue
            arg = arg.strip()
            assert KEY_VARIABLE.match(arg), f"{path.name}: {command} {arg}"
            assert not arg.startswith(("'", '"')), f"{path.name}: {command} on a literal"
        assert bound or path.name == "_lib.lua", f"{path.name} binds no KEYS"


def test_every_script_loads_with_its_library() -> None:
    for name in SCRIPT_NAMES:
        assert "local function emit" in source(name)


def test_keys_share_one_cluster_slot() -> None:
    k = Keys("{tidal}")
    names = [k.job("x"), k.queue("q"), k.dispatch("q"), k.events(), k.worker("w"), k.delayed(),
             k.submissions(), k.log("x"), k.idem("u", "k"), k.host("h")]
    assert all(n.startswith("{tidal}:") for n in names)
    assert len(set(names)) == len(names)
