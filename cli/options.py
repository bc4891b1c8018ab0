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

# -- job options (submit, cron add) -----------------------------------------------------------
_JOB = "Job"
CommandArg = Annotated[
    list[str],
    typer.Argument(
        metavar="CMD", show_default=False,
        help="The command, after `--`: an argv; with --shell, one /bin/sh -c string; with "
        "--python, module:function then arguments (JSON where they parse; name=value for "
        "keyword arguments).",
    ),
]
QueueOpt = Annotated[
    str | None, typer.Option("--queue", "-q", help="Queue [default]", rich_help_panel=_JOB)
]
PriorityOpt = Annotated[
    PriorityChoice | None,
    typer.Option("--priority", "-p", case_sensitive=False, help="Priority [normal]",
                 rich_help_panel=_JOB),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", metavar="SECONDS", help="Kill it after this.", rich_help_panel=_JOB),
]
RetriesOpt = Annotated[
    int | None,
    typer.Option("--retries", min=0, help="Further attempts after a failure.",
                 rich_help_panel=_JOB),
]
TargetHostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Target host: one job per host at a time, in submission order.",
                 rich_help_panel=_JOB),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", metavar="K=V", rich_help_panel=_JOB,
                 help="Environment variable (repeat; a bare K copies it from this shell)."),
]
CwdOpt = Annotated[
    str | None, typer.Option("--cwd", metavar="DIR", help="Working dir.", rich_help_panel=_JOB)
]
TagOpt = Annotated[
    list[str] | None,
    typer.Option("--tag", "-t", metavar="K=V", help="Tag (repeat).", rich_help_panel=_JOB),
]
IdempotencyOpt = Annotated[
    str | None,
    typer.Option("--idempotency-key", metavar="KEY", help="Submit at most once per key.",
                 rich_help_panel=_JOB),
]
ShellOpt = Annotated[
    bool, typer.Option("--shell", help="Run the words via /bin/sh -c.", rich_help_panel=_JOB)
]
PythonOpt = Annotated[
    bool, typer.Option("--python", help="A python job: module:function [ARGS...].",
                       rich_help_panel=_JOB),
]
AfterOpt = Annotated[
    list[str] | None,
    typer.Option("--after", metavar="ID[:on]", rich_help_panel=_JOB,
                 help="Start after this job completed (repeat). ID:failure runs it only if that "
                 "job failed, ID:any whatever happened."),
]
CpuOpt = Annotated[
    float | None, typer.Option("--cpu", min=0, help="Cores it needs.", rich_help_panel=_JOB)
]
MemoryOpt = Annotated[
    int | None,
    typer.Option("--memory", metavar="MB", min=0, help="Memory it needs (MB).",
                 rich_help_panel=_JOB),
]
GpuOpt = Annotated[
    int | None, typer.Option("--gpu", min=0, help="GPUs it needs.", rich_help_panel=_JOB)
]
StaleAfterOpt = Annotated[
    float | None,
    typer.Option("--stale-after", metavar="SECONDS", rich_help_panel=_JOB,
                 help="Expire it if it could not start for this long."),
]
