"""common/config.py: where the CLI finds url, token and redis_url (files in tmp dirs only)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from common import config
from common.config import CliConfig


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean world: cwd, XDG_CONFIG_HOME and HOME in tmp, no TIDAL_* variables."""
    for name in ("TIDAL_URL", "TIDAL_TOKEN", "TIDAL_REDIS_URL", "TIDAL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _write(path: Path, **data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_defaults_when_nothing_is_configured(home: Path) -> None:
    found = config.load()
    assert (found.url, found.token, found.redis_url, found.source) == (
        "http://127.0.0.1:8000", None, None, None,
    )


def test_local_file_beats_user_file(home: Path) -> None:
    _write(home / "xdg/tidal/cli.json", url="http://user:1", token="u", redis_url="redis://u")
    assert config.load().url == "http://user:1"
    _write(home / "work/.tidal/cli.json", url="http://local:2", token="l", redis_url="redis://l")
    found = config.load()
    assert (found.url, found.token, found.redis_url) == ("http://local:2", "l", "redis://l")
    assert found.source == Path(".tidal/cli.json")


def test_tidal_data_dir_names_the_local_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(home / "work/.tidal/cli.json", url="http://dot:1", token="dot")
    _write(home / "elsewhere/cli.json", url="http://else:2", token="else")
    monkeypatch.setenv("TIDAL_DATA_DIR", str(home / "elsewhere"))
    assert (config.load().url, config.load().token) == ("http://else:2", "else")


def test_env_beats_files_and_flags_beat_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(home / "work/.tidal/cli.json", url="http://file:1", token="f", redis_url="redis://f")
    monkeypatch.setenv("TIDAL_URL", "http://env:2/")
    monkeypatch.setenv("TIDAL_TOKEN", "e")
    monkeypatch.setenv("TIDAL_REDIS_URL", "redis://e")
    found = config.load()
    assert (found.url, found.token, found.redis_url) == ("http://env:2", "e", "redis://e")
    found = config.load(url="http://flag:3", token="t", redis_url="redis://t")
    assert (found.url, found.token, found.redis_url) == ("http://flag:3", "t", "redis://t")


def test_file_token_is_not_sent_to_another_url(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(home / "work/.tidal/cli.json", url="http://127.0.0.1:8000", token="local-admin")
    assert config.load(url="http://other:9000").token is None
    assert config.load(url="http://127.0.0.1:8000/").token == "local-admin"
    monkeypatch.setenv("TIDAL_URL", "http://other:9000")
    assert config.load().token is None


def test_broken_files_are_skipped(home: Path) -> None:
    (home / "work/.tidal").mkdir(parents=True)
    (home / "work/.tidal/cli.json").write_text("{not json")
    _write(home / "xdg/tidal/cli.json", url="http://user:1", token="u")
    assert config.load().url == "http://user:1"
    _write(home / "xdg/tidal/cli.json", token="no url")
    assert config.load().url == config.DEFAULT_URL


def test_user_path_defaults_to_dot_config(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config.user_path() == home / "home/.config/tidal/cli.json"


def test_write_cluster_writes_the_data_dir_file_last(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripts (and tests) wait for <data_dir>/cli.json: when it appears, the user file
    must already be there."""
    landed: list[Path] = []
    replace = config.os.replace

    def record(src: Path, dst: Path) -> None:
        replace(src, dst)
        landed.append(Path(dst))

    monkeypatch.setattr(config.os, "replace", record)
    config.write_cluster(CliConfig(url="http://127.0.0.1:8123"), home / "data")
    assert landed == [home / "xdg/tidal/cli.json", home / "data/cli.json"]


def test_write_cluster_writes_both_files_private(home: Path) -> None:
    cfg = CliConfig(url="http://127.0.0.1:8123", token="tdl_x", redis_url="redis://127.0.0.1:1/0")
    paths = config.write_cluster(cfg, home / "data")
    assert paths == [home / "data/cli.json", home / "xdg/tidal/cli.json"]
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == {
            "url": "http://127.0.0.1:8123", "token": "tdl_x", "redis_url": "redis://127.0.0.1:1/0",
        }
    assert not list((home / "data").glob(".*tmp"))
    # what `tidal up` wrote is what the CLI then reads, with no flags
    found = config.load()
    assert (found.url, found.token) == ("http://127.0.0.1:8123", "tdl_x")
