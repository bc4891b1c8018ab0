"""Where the CLI and the SDK find the API URL, the token and the Redis URL with no flags.

`tidal up` writes `{"url", "token", "redis_url"}` (mode 0600) to `<data_dir>/cli.json` and to
`$XDG_CONFIG_HOME/tidal/cli.json` (default `~/.config/tidal/cli.json`). Lookup, per field:

1. explicit flags;
2. environment: `TIDAL_URL`, `TIDAL_TOKEN` (`TIDAL_REDIS_URL` for the service commands);
3. the local file: `$TIDAL_DATA_DIR/cli.json` if that variable is set, else `./.tidal/cli.json`;
4. the user file: `$XDG_CONFIG_HOME/tidal/cli.json`;
5. defaults: `http://127.0.0.1:8000`, no token.

The first file that exists and parses is used as a whole (its url, token and redis_url belong
together: they describe one cluster). A token read from a file is sent only to the URL that
file names: if the URL comes from a flag or `TIDAL_URL` and differs, the file's token is not
used, so a local admin token never leaks to another server.

Only the standard library here: the CLI imports this on every start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
FILE_NAME = "cli.json"
LOCAL_DIR = ".tidal"


@dataclass(frozen=True, slots=True)
class CliConfig:
    url: str = DEFAULT_URL
    token: str | None = None
    redis_url: str | None = None
    source: Path | None = None  # the file the values came from, if any

    def to_json(self) -> dict[str, str | None]:
        return {"url": self.url, "token": self.token, "redis_url": self.redis_url}


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def local_path(env: Mapping[str, str] | None = None) -> Path:
    """`$TIDAL_DATA_DIR/cli.json`, else `./.tidal/cli.json` (relative to the working dir)."""
    data_dir = _env(env).get("TIDAL_DATA_DIR")
    return Path(data_dir or LOCAL_DIR) / FILE_NAME


def user_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/tidal/cli.json`, default `~/.config/tidal/cli.json`."""
    base = _env(env).get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tidal" / FILE_NAME


def read_file(path: Path) -> CliConfig | None:
    """The config in `path`, or None when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not data["url"]:
        return None
    token, redis_url = data.get("token"), data.get("redis_url")
    return CliConfig(
        url=data["url"],
        token=token if isinstance(token, str) and token else None,
        redis_url=redis_url if isinstance(redis_url, str) and redis_url else None,
        source=path,
    )


def find_file(env: Mapping[str, str] | None = None) -> CliConfig | None:
    """The first config file that exists and parses: local, then user."""
    for path in (local_path(env), user_path(env)):
        found = read_file(path)
        if found is not None:
            return found
    return None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def load(
    url: str | None = None,
    token: str | None = None,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CliConfig:
    """Resolve url, token and redis_url: flags → environment → local file → user file →
    defaults (see the module docstring)."""
    environ = _env(env)
    file = find_file(environ) or CliConfig()
    explicit_url = url or environ.get("TIDAL_URL") or None
    final_url = explicit_url or file.url
    file_token = file.token if explicit_url is None or _same_url(explicit_url, file.url) else None
    return CliConfig(
        url=final_url.rstrip("/"),
        token=token or environ.get("TIDAL_TOKEN") or file_token,
        redis_url=redis_url or environ.get("TIDAL_REDIS_URL") or file.redis_url,
        source=file.source,
    )


def write(config: CliConfig, paths: list[Path]) -> list[Path]:
    """Write `config` as JSON with mode 0600 to every path (atomically); returns the paths."""
    text = json.dumps(config.to_json(), indent=2) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return paths


def cluster_paths(data_dir: Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where `tidal up` writes: `<data_dir>/cli.json` and the user file."""
    return [data_dir / FILE_NAME, user_path(env)]


def write_cluster(
    config: CliConfig, data_dir: Path, env: Mapping[str, str] | None = None
) -> list[Path]:
    """What `tidal up` does: write the user file, then `<data_dir>/cli.json`. The data-dir
    file is last because it is the one a script waits for: when it appears, both exist."""
    paths = cluster_paths(data_dir, env)
    write(config, paths[::-1])
    return paths
