"""`tidal`: the command line. Each command parses its options, makes one SDK call and hands
the answer to cli/output.py. Errors are mapped to a message and an exit code once, in
`TidalGroup.invoke`: `error: <message>` on stderr and exit 1 (click's usage errors exit 2).

The service commands (`api`, `scheduler`, `worker`, `up`) import their part lazily, so the
HTTP commands start fast.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

import click
import orjson
import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from cli import output
from cli.options import (
    AfterOpt,
    AllowModuleOpt,
    CommandArg,
    ConcurrencyOpt,
    CpuOpt,
    CwdOpt,
    DataDirOpt,
    EnvOpt,
    FollowOpt,
    GpuOpt,
    HostFilterOpt,
    HostOpt,
    IdempotencyOpt,
    JobIdArg,
    JsonOpt,
    MemoryOpt,
    OwnerOpt,
    PortOpt,
    PriorityOpt,
    PythonOpt,
    QueueFilterOpt,
    QueueOpt,
    RedisUrlOpt,
    RetriesOpt,
    ShellOpt,
    StaleAfterOpt,
    StateOpt,
    TagOpt,
    TargetHostOpt,
    TimeoutOpt,
    TokenOpt,
    UrlOpt,
)
from common import config
from common.client import Client
from common.errors import TidalError
from common.models import Job, JobPage, ProgressUpdate, State

if TYPE_CHECKING:
    from common.settings import Settings

EXIT_ERROR = 1
EXIT_TIMEOUT = 124
EXIT_CANCELLED = 130


class TidalGroup(TyperGroup):
    """The root group: maps every error a command raises to one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TidalError as exc:
            output.error(exc.message, exc.details)
        except TimeoutError as exc:
            output.error(str(exc))
        except ValidationError as exc:  # settings from TIDAL_* variables that do not parse
            output.error(f"invalid settings: {exc}")
        except BrokenPipeError:
            _silence_stdout()
        except OSError as exc:
            output.error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_CANCELLED) from None
        raise typer.Exit(EXIT_ERROR)


def _silence_stdout() -> None:
    """The reader of our stdout went away (`tidal logs ID | head`): stop writing quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


app = typer.Typer(
    name="tidal",
    cls=TidalGroup,
    help="Tidal: run jobs on a cluster of workers, follow their output, keep the record.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="Manage API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


def get_client(url: str | None = None, token: str | None = None) -> Client:
    """The SDK client for the HTTP commands (the tests replace this factory)."""
    return Client.from_config(url=url, token=token)


def show(value: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print a command's answer: the whole document with --json, else its summary."""
    if as_json:
        output.json(value)
    else:
        render(value)


def exit_code_for(job: Job) -> int:
    """The exit code `submit --follow` and `wait` end with: a timeout is 124 and a cancel
    130 (whatever signal ended the process); else the job's exit code (a signal N as
    128 + N); else 0 for completed and 1 for failed or expired."""
    if job.reason == "timeout":
        return EXIT_TIMEOUT
    if job.state == State.CANCELLED:
        return EXIT_CANCELLED
    code = job.exit_code
    if job.state == State.COMPLETED:
        return code if code is not None and 0 <= code <= 255 else 0
    if code is None or code == 0 or code > 255:
        return EXIT_ERROR
    return code if code > 0 else min(128 - code, 255)


# -- submitting -------------------------------------------------------------------------


def _pairs(values: list[str] | None, option: str, *, from_env: bool = False) -> dict[str, str]:
    """`K=V` words as a dict. With from_env, a bare `K` takes its value from this shell."""
    result: dict[str, str] = {}
    for word in values or []:
        key, sep, val = word.partition("=")
        if not sep and from_env and key in os.environ:
            val, sep = os.environ[key], "="
        if not key or not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {word!r}", param_hint=option)
        result[key] = val
    return result


def _jsonish(word: str) -> Any:
    """A python job argument: JSON when it parses (1, true, [1,2], {"a":1}), else the text."""
    try:
        return orjson.loads(word)
    except orjson.JSONDecodeError:
        return word


def _work(command: list[str], shell: bool, python: bool) -> dict[str, Any]:
    """The work part of a submission from the words after `--`."""
    if shell and python:
        raise typer.BadParameter("use --shell or --python, not both", param_hint="--shell")
    if python:
        function, *words = command
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for word in words:
            name, sep, val = word.partition("=")
            if sep and name.isidentifier():
                kwargs[name] = _jsonish(val)
            else:
                args.append(_jsonish(word))
        return {"kind": "python", "function": function, "args": args, "kwargs": kwargs}
    if shell:
        return {"kind": "shell", "command": " ".join(command)}
    return {"kind": "shell", "command": list(command)}


def _follow(client: Client, job_id: str, as_json: bool) -> int:
    """Stream a job's output until it ends, with its progress (a bar on a terminal, plain
    lines otherwise; none with --json); returns the exit code for this process."""
    final: Job | None = None
    if as_json:
        for item in client.follow(job_id):
            if isinstance(item, Job):
                final = item
            else:
                output.json_line(item)
    else:
        with output.ProgressView() as view:
            for item in client.follow(job_id, progress=True):
                if isinstance(item, Job):
                    final = item
                elif isinstance(item, ProgressUpdate):
                    view.show(item.percent, item.stage, item.message)
                else:
                    output.log_line(item)
    if final is None:  # pragma: no cover - follow() always ends with the job
        raise TidalError(f"the log stream of job {job_id} ended without the job")
    if as_json:
        output.json_line(final)
    else:
        output.job_finished(final)
    return exit_code_for(final)


@dataclass
class JobOptions:
    """The job options `submit` and `cron add` share, turned into a submission."""

    queue: str | None = None
    priority: str | None = None
    timeout: float | None = None
    retries: int | None = None
    host: str | None = None
    env: list[str] | None = None
    cwd: str | None = None
    tag: list[str] | None = None
    idempotency_key: str | None = None
    after: list[str] | None = None
    cpu: float | None = None
    memory: int | None = None
    gpu: int | None = None
    stale_after: float | None = None

    def submission(self, command: list[str], shell: bool, python: bool) -> dict[str, Any]:
        options = {
            "queue": self.queue, "priority": self.priority, "timeout": self.timeout,
            "retries": self.retries, "host": self.host, "cwd": self.cwd,
            "idempotency_key": self.idempotency_key, "stale_after": self.stale_after,
            "env": _pairs(self.env, "--env", from_env=True) or None,
            "tags": _pairs(self.tag, "--tag") or None,
            "depends_on": [_dependency(a) for a in self.after or []] or None,
            "resources": {k: v for k, v in (("cpu", self.cpu), ("memory_mb", self.memory),
                                             ("gpu", self.gpu)) if v is not None} or None,
        }
        return _work(command, shell, python) | {k: v for k, v in options.items() if v is not None}


def _dependency(text: str) -> dict[str, str]:
    job_id, _, on = text.partition(":")
    if on and on not in ("success", "failure", "any"):
        raise typer.BadParameter(f"{text!r}: after ':' comes success, failure or any",
                                 param_hint="--after")
    return {"id": job_id, "on": on or "success"}


def _start_time(at: str | None, in_: str | None) -> str | None:
    """--at TIME (ISO 8601, or HH:MM today/tomorrow in UTC) or --in DURATION (90s, 10m, 2h,
    1d) as an ISO 8601 UTC time."""
    if at and in_:
        raise typer.BadParameter("give --at or --in, not both", param_hint="--at")
    now = datetime.now(UTC)
    if in_:
        return (now + timedelta(seconds=parse_duration(in_))).isoformat()
    if not at:
        return None
    if re.fullmatch(r"\d{1,2}:\d{2}", at):
        hour, minute = map(int, at.split(":"))
        when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return (when if when > now else when + timedelta(days=1)).isoformat()
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError as exc:
        raise typer.BadParameter(f"{at!r} is not an ISO 8601 time or HH:MM",
                                 param_hint="--at") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d' → seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 10m, 2h or 1d",
                                 param_hint="--in")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: CommandArg,
    queue: QueueOpt = None,
    priority: PriorityOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    host: TargetHostOpt = None,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    tag: TagOpt = None,
    idempotency_key: IdempotencyOpt = None,
    after: AfterOpt = None,
    at: Annotated[str | None, typer.Option(
        "--at", metavar="TIME", rich_help_panel="Job",
        help="Start at this time (ISO 8601, or HH:MM in UTC).")] = None,
    in_: Annotated[str | None, typer.Option(
        "--in", metavar="DURATION", rich_help_panel="Job",
        help="Start after this long (90s, 10m, 2h, 1d).")] = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    stale_after: StaleAfterOpt = None,
    shell: ShellOpt = False,
    python: PythonOpt = False,
    follow: FollowOpt = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Submit a job; print its id, or with --follow stream its output and exit with its code.

    Example: tidal submit --follow -- sh -c 'echo hello; echo oops >&2; exit 3'
    """
    opts = JobOptions(queue, priority, timeout, retries, host, env, cwd, tag, idempotency_key,
                      after, cpu, memory, gpu, stale_after)
    submission = opts.submission(command, shell, python)
    if (start := _start_time(at, in_)) is not None:
        submission["scheduled_at"] = start
    with get_client(url, token) as client:
        job = client.submit(submission)
        if follow:
            try:
                code = _follow(client, job.id, as_json)
            except KeyboardInterrupt:
                output.detached(job.id)
                raise
            raise typer.Exit(code)
    if as_json:
        output.json(job)
    else:
        output.value(job.id)


# -- looking at jobs ----------------------------------------------------------------------


@app.command()
def status(job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = None,
           token: TokenOpt = None) -> None:
    """Show one job: state, why it waits, where it runs, how it ended."""
    with get_client(url, token) as client:
        job = client.get(job_id)
    show(job, as_json, output.job_panel)


@app.command("list")
def list_jobs(
    state: StateOpt = None,
    queue: QueueFilterOpt = None,
    host: HostFilterOpt = None,
    owner: OwnerOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=500, help="Page size.")] = 50,
    cursor: Annotated[str | None, typer.Option("--cursor", help="Page to start at.")] = None,
    all_pages: Annotated[
        bool, typer.Option("--all", help="Every page, not only the first.")
    ] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """List jobs, newest first."""
    with get_client(url, token) as client:
        if all_pages:
            jobs, next_cursor = [*client.iter_jobs(state, queue, host, owner)], None
        else:
            page = client.list(state, queue, host, owner, limit=limit, cursor=cursor)
            jobs, next_cursor = page.jobs, page.next_cursor
    if as_json:
        output.json(JobPage(jobs=jobs, next_cursor=next_cursor))
    else:
        output.jobs_table(jobs, next_cursor)


@app.command()
def logs(job_id: JobIdArg, follow: FollowOpt = False, as_json: JsonOpt = False,
         url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Print a job's output; with -f, follow it until the job ends.

    stdout lines go to stdout, stderr lines to stderr. --json prints one JSON object per line.
    """
    with get_client(url, token) as client:
        if follow:
            _follow(client, job_id, as_json)
            return
        for line in client.iter_logs(job_id):
            if as_json:
                output.json_line(line)
            else:
                output.log_line(line)


@app.command()
def cancel(job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = None,
           token: TokenOpt = None) -> None:
    """Cancel a job (a running one is killed by its worker)."""
    with get_client(url, token) as client:
        job = client.cancel(job_id)
    show(job, as_json, output.cancelled)


@app.command()
def wait(
    job_id: JobIdArg,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="SECONDS", help="Give up after this.")
    ] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Wait until a job ends; exit with its exit code (like submit --follow). Shows the
    job's progress meanwhile (a bar on a terminal, plain lines otherwise; none with --json)."""
    with get_client(url, token) as client:
        if as_json:
            job = client.wait(job_id, timeout=timeout)
        else:
            with output.ProgressView() as view:
                for job in client.watch(job_id, timeout=timeout):
                    view.show_job(job)
    show(job, as_json, output.job_panel)
    raise typer.Exit(exit_code_for(job))


@app.command()
def workers(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """List the live workers."""
    with get_client(url, token) as client:
        found = client.workers()
    show(found, as_json, output.workers_table)


@app.command()
def health(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Check the API and what it depends on (exit 1 unless all is well)."""
    with get_client(url, token) as client:
        answer = client.health()
    show(answer, as_json, output.health)
    if answer.status != "ok":
        raise typer.Exit(EXIT_ERROR)


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option("--user", "-u", help="Who the token is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="May manage tokens and all jobs.")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create an API token (needs an admin token). It is printed once."""
    with get_client(url, token) as client:
        created = client.create_token(user, admin=admin)
    show(created, as_json, output.token_created)


@app.command()
def retry(job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = None,
          token: TokenOpt = None) -> None:
    """Run a finished job again (a new attempt of the same job); print its id."""
    with get_client(url, token) as client:
        job = client.retry(job_id)
    if as_json:
        output.json(job)
    else:
        output.value(job.id)


@app.command()
def queues(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Queues: waiting, in flight, running, delayed, slots, and jobs ended lately."""
    with get_client(url, token) as client:
        found = client.queues()
    show(found, as_json, output.queues_table)


@app.command()
def events(job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = None,
           token: TokenOpt = None) -> None:
    """Every transition of a job: when, to which state, by whom."""
    with get_client(url, token) as client:
        found = client.events(job_id)
    show(found, as_json, output.events_table)


@app.command()
def hosts(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Hosts: the job holding each, and the jobs waiting for it in order."""
    with get_client(url, token) as client:
        found = client.hosts()
    show(found, as_json, output.hosts_table)


@app.command()
def dashboard(
    no_open: Annotated[bool, typer.Option(
        "--no-open", help="Only print the address; do not start a browser.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Open the dashboard in a browser, signed in with this CLI's token; print its address.

    The token travels in the address's #fragment, which a browser never sends to a server:
    the page keeps it in the browser's local storage and strips it from the address."""
    import webbrowser
    from urllib.parse import quote

    found = config.load(url=url, token=token)
    address = found.url + "/"
    if found.token:
        address += "#token=" + quote(found.token, safe="")
    output.value(address)
    if not no_open:
        webbrowser.open(address)


cron_app = typer.Typer(help="Cron schedules: submit a job at every tick (UTC).",
                       no_args_is_help=True)
app.add_typer(cron_app, name="cron")


@cron_app.command("add")
def cron_add(
    name: Annotated[str, typer.Argument(help="The schedule's name.", show_default=False)],
    cron: Annotated[str, typer.Option("--cron", metavar="EXPR",
                                      help="Cron expression, e.g. '*/5 * * * *' (UTC).")],
    command: CommandArg,
    queue: QueueOpt = None,
    priority: PriorityOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    host: TargetHostOpt = None,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    tag: TagOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    stale_after: StaleAfterOpt = None,
    shell: ShellOpt = False,
    python: PythonOpt = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add a schedule. Example: tidal cron add backup --cron '0 3 * * *' -- make backup"""
    opts = JobOptions(queue, priority, timeout, retries, host, env, cwd, tag, None, None, cpu,
                      memory, gpu, stale_after)
    with get_client(url, token) as client:
        schedule = client.create_schedule(name, cron, opts.submission(command, shell, python))
    if as_json:
        output.json(schedule)
    else:
        output.schedules_table([schedule])


@cron_app.command("list")
def cron_list(as_json: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """List the schedules."""
    with get_client(url, token) as client:
        found = client.schedules()
    show(found, as_json, output.schedules_table)


@cron_app.command("remove")
def cron_remove(
    name: Annotated[str, typer.Argument(help="The schedule's name.", show_default=False)],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Remove a schedule (jobs it already submitted are not touched)."""
    with get_client(url, token) as client:
        client.remove_schedule(name)
    output.info(f"schedule {name} removed")


# -- services ---------------------------------------------------------------------------


def service_settings(redis_url: str | None, **updates: Any) -> Settings:
    """Settings from TIDAL_* plus the flags given; the Redis URL is the flag, else
    TIDAL_REDIS_URL, else the cli.json of `tidal up`, else the default."""
    from common.settings import Settings

    settings = Settings()
    found = config.load(redis_url=redis_url).redis_url
    if found:
        updates["redis_url"] = found
    return settings.model_copy(update={k: v for k, v in updates.items() if v is not None})


@app.command(rich_help_panel="Services")
def api(host: HostOpt = None, port: PortOpt = None, redis_url: RedisUrlOpt = None) -> None:
    """Run the HTTP API (until SIGTERM / Ctrl-C)."""
    from api.main import run

    run(service_settings(redis_url, api_host=host, api_port=port))


@app.command(rich_help_panel="Services")
def scheduler(redis_url: RedisUrlOpt = None) -> None:
    """Run a scheduler, with the recorder inside unless TIDAL_RECORDER=false (until
    SIGTERM / Ctrl-C)."""
    from scheduler.main import run

    run(service_settings(redis_url))


@app.command(rich_help_panel="Services")
def recorder(redis_url: RedisUrlOpt = None) -> None:
    """Run the recorder alone, mirroring events into SQL (run the schedulers with
    TIDAL_RECORDER=false; `tidal up` and docker-compose do). Until SIGTERM / Ctrl-C."""
    from scheduler.main import run_recorder

    run_recorder(service_settings(redis_url))


@app.command(rich_help_panel="Services")
def worker(
    queue: Annotated[
        list[str] | None, typer.Option("--queue", "-q", help="A queue to serve (repeat).")
    ] = None,
    concurrency: ConcurrencyOpt = None,
    allow_module: AllowModuleOpt = None,
    redis_url: RedisUrlOpt = None,
) -> None:
    """Run a worker (until SIGTERM / Ctrl-C)."""
    from worker.main import run

    run(service_settings(redis_url, queues=queue or None, concurrency=concurrency,
                         allow_modules=allow_module or None))


@app.command(rich_help_panel="Services")
def up(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="API port.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="API address.")] = "127.0.0.1",
    data_dir: DataDirOpt = None,
    workers: Annotated[int, typer.Option("--workers", "-w", min=0, help="Worker processes.")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                             help="Jobs at once per worker.")] = 4,
    allow_module: AllowModuleOpt = None,
    redis_url: RedisUrlOpt = None,
    fsync: Annotated[Literal["always", "everysec"], typer.Option(
        "--fsync", help="The started Redis' appendfsync: always (nothing acknowledged is "
        "lost) or everysec (faster; a Redis crash while its disk is busy can lose the last "
        "~2 s). See docs/reliability.md.")] = "always",
) -> None:
    """Run a whole local cluster: Redis, the API, a scheduler and workers.

    Redis is started unless --redis-url (or TIDAL_REDIS_URL) is given. Children that die are
    restarted. Ctrl-C stops it all.
    """
    from cli.up import UpOptions, run_up
    from common.settings import Settings

    run_up(UpOptions(
        host=host, port=port, data_dir=data_dir or Settings().data_dir, workers=workers,
        concurrency=concurrency, allow_modules=allow_module or [],
        redis_url=redis_url or os.environ.get("TIDAL_REDIS_URL") or None, fsync=fsync,
    ))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            output.value(f"tidal {version('tidal')}")
        except PackageNotFoundError:
            output.value("tidal (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Tidal: run jobs on a cluster of workers, follow their output, keep the record."""



from cli.doctor import doctor as doctor_command  # noqa: E402 (after app and service_settings)

app.command()(doctor_command)
