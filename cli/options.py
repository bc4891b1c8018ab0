"""Options and arguments shared by several commands, as `Annotated` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

StateName = Literal[
    "pending", "queued", "dispatched", "running", "retrying",
    "completed", "failed", "cancelled", "expired",
]
PriorityChoice = Literal["critical", "high", "normal", "low", "background"]

# -- connection (HTTP commands) -----------------------------------------------------------
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", metavar="URL", show_default=False, rich_help_panel="Connection",
        help="API URL. Default: $TIDAL_URL, then the cli.json that `tidal up` wrote, "
        "then http://127.0.0.1:8000.",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", metavar="TOKEN", show_default=False, rich_help_panel="Connection",
        help="API token. Default: $TIDAL_TOKEN, then the cli.json that `tidal up` wrote.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (the whole document) instead of a summary.")
]
JobIdArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job id.", show_default=False)]
FollowOpt = Annotated[
    bool, typer.Option("--follow", "-f", help="Stream the output live until the job ends.")
]

# -- filters --------------------------------------------------------------------------------
StateOpt = Annotated[StateName | None, typer.Option("--state", help="Only jobs in this state.")]
QueueFilterOpt = Annotated[str | None, typer.Option("--queue", help="Only jobs of this queue.")]
HostFilterOpt = Annotated[str | None, typer.Option("--host", help="Only jobs for this host.")]
OwnerOpt = Annotated[str | None, typer.Option("--owner", help="Only jobs of this user.")]

# -- services ---------------------------------------------------------------------------------
RedisUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url", metavar="URL", show_default=False,
        help="Redis URL. Default: $TIDAL_REDIS_URL, then the cli.json that `tidal up` wrote, "
        "then redis://127.0.0.1:6379/0.",
    ),
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Port to listen on.")]
ConcurrencyOpt = Annotated[
    int | None, typer.Option("--concurrency", "-c", min=1, help="Jobs run at once per worker.")
]
AllowModuleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-module", metavar="MODULE",
        help="A module whose functions python jobs may call (repeat for more).",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", metavar="DIR", show_default=False,
        help="Where Redis data, logs and cli.json live. Default: $TIDAL_DATA_DIR or .tidal",
    ),
]
