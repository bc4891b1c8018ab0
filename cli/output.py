"""All the CLI's printing: rich for people (tables, panels, colours), orjson for `--json`.

stdout carries results only (an id, a table, a document, a job's own stdout); messages,
errors and a job's stderr go to stderr. Consoles are built for the current sys.stdout /
sys.stderr, so the test runner's captured streams are honoured.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from common.cron import Schedule
from common.models import (
    Health,
    HostInfo,
    Job,
    JobEvents,
    LogLine,
    QueueInfo,
    State,
    TokenCreated,
    WorkerInfo,
)

STATE_STYLES: dict[str, str] = {
    State.PENDING: "dim",
    State.QUEUED: "cyan",
    State.DISPATCHED: "cyan",
    State.RUNNING: "bold blue",
    State.RETRYING: "yellow",
    State.COMPLETED: "green",
    State.FAILED: "bold red",
    State.CANCELLED: "magenta",
    State.EXPIRED: "red",
}

_consoles: dict[bool, Console] = {}


def _console(stderr: bool = False) -> Console:
    file = sys.stderr if stderr else sys.stdout
    console = _consoles.get(stderr)
    if console is None or console.file is not file:
        console = Console(file=file, stderr=stderr, highlight=False, soft_wrap=True)
        _consoles[stderr] = console
    return console


def _color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


# -- plain values -------------------------------------------------------------------------


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """A relative time for tables: '3s ago', '5m ago', '2h ago', '4d ago' ('-' for None)."""
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "in " + ago(now or datetime.now(UTC), when).removesuffix(" ago")
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def command_text(job: Job, width: int | None = None) -> str:
    """The job's work as one line: the argv joined, the shell string, or module:function."""
    if job.kind == "python":
        text = f"{job.function}({', '.join(orjson.dumps(a).decode() for a in job.args)})"
    elif isinstance(job.command, list):
        text = " ".join(_quote(a) for a in job.command)
    else:
        text = job.command or ""
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=@%+," for c in arg) else repr(arg)


def _state(job_state: str) -> Text:
    return Text(str(job_state), style=STATE_STYLES.get(job_state, ""))


def _time(when: datetime | None) -> str:
    if when is None:
        return "-"
    return f"{when.isoformat(timespec='seconds')} ({ago(when)})"


# -- machine output ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def json(value: Any) -> None:
    """`--json`: the document (a model, a list of models, or plain data), indented."""
    sys.stdout.write(orjson.dumps(_plain(value), option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def json_line(value: Any) -> None:
    """One compact JSON document per line (streams: `logs --json`, `submit -f --json`)."""
    sys.stdout.write(orjson.dumps(_plain(value)).decode() + "\n")
    sys.stdout.flush()


def value(text: str) -> None:
    """One bare value on stdout (a job id, a token), so `$(tidal ...)` captures just it."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- messages ---------------------------------------------------------------------------


def info(message: str) -> None:
    _console(stderr=True).print(message)


def warn(message: str) -> None:
    _console(stderr=True).print(f"[yellow]{escape(message)}[/]")


def error(message: str, details: Any = None) -> None:
    """The one way the CLI reports a failure: `error: <message>` in red on stderr."""
    console = _console(stderr=True)
    console.print(f"[bold red]error:[/] {escape(message)}")
    for line in _detail_lines(details):
        console.print(f"  {escape(line)}")


def _detail_lines(details: Any) -> list[str]:
    if details is None or details == {} or details == []:
        return []
    if isinstance(details, list) and all(isinstance(d, dict) for d in details):
        lines = []
        for d in details:
            loc = d.get("loc")
            if isinstance(loc, list | tuple):
                loc = ".".join(str(p) for p in loc)
            msg = d.get("msg") or d.get("message") or orjson.dumps(d).decode()
            lines.append(f"{loc}: {msg}" if loc else str(msg))
        return lines
    if isinstance(details, str):
        return [details]
    return [orjson.dumps(details).decode()]


# -- logs -------------------------------------------------------------------------------


def log_line(line: LogLine) -> None:
    """A job's output line, verbatim: stdout to stdout; stderr (red on a terminal) and
    Tidal's own system lines (dim, prefixed) to stderr."""
    if line.stream == "stdout":
        sys.stdout.write(line.text + "\n")
        sys.stdout.flush()
        return
    stream = sys.stderr
    text = line.text if line.stream == "stderr" else f"[tidal] {line.text}"
    if _color(stream):
        code = "31" if line.stream == "stderr" else "2"
        text = f"\x1b[{code}m{text}\x1b[0m"
    stream.write(text + "\n")
    stream.flush()


def progress_text(percent: float | None, stage: str | None, message: str | None) -> str:
    """A progress report in words: `40% compiling: 3 of 8 modules`."""
    words = [f"{percent:g}%" if percent is not None else "", stage or ""]
    text = " ".join(w for w in words if w)
    return f"{text}: {message}" if message else text


class ProgressView:
    """A job's progress while the CLI follows or waits for it (`submit --follow`, `logs -f`,
    `wait`). On a terminal (stderr) a rich progress bar, drawn from the first report on,
    with the job's own output printed above it; otherwise one plain `[tidal] progress …`
    line on stderr per new report, so pipes and logs stay line-oriented. `--json` makes
    none: its output stays one document per line."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last: tuple[float | None, str | None, str | None] | None = None
        self._tty = sys.stderr.isatty()

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def show(self, percent: float | None, stage: str | None, message: str | None) -> None:
        if (percent, stage, message) == self._last:
            return
        self._last = (percent, stage, message)
        if not self._tty:
            text = f"[tidal] progress {progress_text(percent, stage, message)}"
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            return
        if self._bar is None:
            self._bar = Progress(
                TextColumn("[bold]{task.fields[stage]}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[message]}"), console=_console(stderr=True),
                redirect_stdout=sys.stdout.isatty(), redirect_stderr=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("job", total=100, stage="", message="")
        assert self._task is not None
        self._bar.update(self._task, completed=percent or 0, stage=escape(stage or ""),
                         message=escape(message or ""))

    def show_job(self, job: Job) -> None:
        """The progress in a job document, if it has any."""
        p = job.progress
        if p is not None and (p.percent is not None or p.stage or p.message):
            self.show(p.percent, p.stage, p.message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def detached(job_id: str) -> None:
    """Ctrl-C while following: the job itself goes on."""
    info(f"stopped following; job {escape(job_id)} keeps running "
         f"(tidal cancel {escape(job_id)} to stop it)")


def job_finished(job: Job) -> None:
    """After a follow: one line on stderr if the job did not complete."""
    if job.state == State.COMPLETED:
        return
    reason = job.error or job.reason or ""
    code = f", exit code {job.exit_code}" if job.exit_code is not None else ""
    tail = f": {reason}" if reason else ""
    _console(stderr=True).print(
        f"[{STATE_STYLES.get(job.state, '')}]job {job.id} {job.state}{code}[/]{escape(tail)}"
    )


# -- jobs -------------------------------------------------------------------------------


def job_panel(job: Job) -> None:
    """`tidal status`: the job's fields in a panel."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("state", _state(job.state)),
        ("waiting", _wait_text(job)),
        ("queue", job.queue),
        ("priority", job.priority),
        ("host", job.host),
        ("owner", job.owner),
        ("attempt", f"{job.attempt} of {job.retries + 1}"),
        ("worker", job.worker),
        ("created", _time(job.created_at)),
        ("started", _time(job.started_at)),
        ("finished", _time(job.finished_at)),
        ("exit code", None if job.exit_code is None else str(job.exit_code)),
        ("reason", job.reason),
        ("error", job.error),
        ("command", command_text(job)),
    ]
    p = job.progress
    if p is not None and (p.percent is not None or p.stage or p.message):
        rows.insert(2, ("progress", progress_text(p.percent, p.stage, p.message)
                        + (f" ({ago(p.time)})" if p.time else "")))
    rows += [("waited", _ms(job.wait_ms)), ("ran", _ms(job.run_ms)),
             ("peak RSS", None if job.peak_rss_kb is None else _kb(job.peak_rss_kb)),
             ("CPU", None if job.cpu_s is None else f"{job.cpu_s:.2f}s")]
    for name, val in rows:
        if val is not None and val != "":
            grid.add_row(name, val if isinstance(val, Text) else Text(str(val)))
    _console().print(Panel(grid, title=f"job {escape(job.id)}", title_align="left", expand=False))


def _ms(ms: int | None) -> str | None:
    """A duration for people: 850ms, 12.3s, 4m05s, 2h10m."""
    if ms is None:
        return None
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _kb(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB" if kb >= 1024 else f"{kb} kB"


def jobs_table(jobs: Sequence[Job], next_cursor: str | None = None) -> None:
    """`tidal list`."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    queue_width = min(16, max([len(j.queue) for j in jobs] + [5]))
    widths = {"ID": 26, "STATE": 9, "QUEUE": queue_width, "PRIORITY": 10, "CREATED": 8, "EXIT": 4}
    for name in ("ID", "STATE", "QUEUE", "PRIORITY", "COMMAND", "CREATED", "EXIT"):
        # one line per job: the command gives way first and is cut with an ellipsis
        table.add_column(name, no_wrap=True, overflow="ellipsis", min_width=widths.get(name),
                         max_width=60 if name == "COMMAND" else None)
    for job in jobs:
        table.add_row(
            job.id, _state(job.state), job.queue, job.priority, command_text(job, width=60),
            ago(job.created_at), "-" if job.exit_code is None else str(job.exit_code),
        )
    if jobs:
        _console().print(table)
    else:
        info("no jobs")
    if next_cursor:
        info(f"[dim]more jobs: --cursor {escape(next_cursor)}, or --all[/]")


def workers_table(workers: Iterable[WorkerInfo]) -> None:
    """`tidal workers`."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "HOSTNAME", "PID", "QUEUES", "SLOTS", "RUNNING", "HEARTBEAT"):
        table.add_column(name, no_wrap=True)
    rows = 0
    for w in workers:
        rows += 1
        table.add_row(
            w.id, w.hostname, str(w.pid), ",".join(w.queues), str(w.slots),
            str(len(w.running)), ago(w.last_heartbeat),
        )
    if rows:
        _console().print(table)
    else:
        info("no live workers")


def hosts_table(hosts: Iterable[HostInfo]) -> None:
    """`tidal hosts`."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("HOST", "HOLDER", "WAITING", "NEXT"):
        table.add_column(name, no_wrap=True, min_width=26 if name in ("HOLDER", "NEXT") else None)
    rows = [(h.host, h.holder or "-", str(h.waiting), h.waiters[0] if h.waiters else "-")
            for h in hosts]
    for row in rows:
        table.add_row(*row)
    if rows:
        _console().print(table)
    else:
        info("no host is held or waited for")


def queues_table(queues: Iterable[QueueInfo]) -> None:
    """`tidal queues` (80 columns wide; --json has the workers count too)."""
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    columns = ("QUEUE", "QUEUED", "INFLIGHT", "RUNNING", "DELAYED", "SLOTS", "OK/1M", "FAIL/1M",
               "OK/1H", "FAIL/1H")
    for name in columns:
        table.add_column(name, no_wrap=True, justify="left" if name == "QUEUE" else "right")
    rows = 0
    for q in queues:
        rows += 1
        failed = [Text(str(n), style="red" if n else "") for n in (q.failed_1m, q.failed_1h)]
        table.add_row(q.queue, str(q.queued), str(q.in_flight), str(q.running), str(q.delayed),
                      str(q.slots), str(q.completed_1m), failed[0], str(q.completed_1h),
                      failed[1])
    if rows:
        _console().print(table)
    else:
        info("no queues yet")


def events_table(found: JobEvents) -> None:
    """`tidal events ID`."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("SEQ", "TIME", "STATE", "BY", "DETAILS"):
        table.add_column(name, no_wrap=name != "DETAILS", justify="right" if name == "SEQ"
                         else "left")
    for e in found.events:
        details = " ".join(f"{k}={v}" for k, v in sorted(e.data.items()) if v not in ("", None))
        when = e.time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        table.add_row(str(e.seq), when, _state(e.state), Text(e.by), Text(details))
    if found.events:
        _console().print(table)
    else:
        info("no events recorded yet")
    if not found.complete:
        warn("the history is behind: newer transitions are not recorded yet")


def schedules_table(schedules: Iterable[Schedule]) -> None:
    """`tidal cron list`."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("NAME", "CRON", "NEXT", "OWNER", "COMMAND"):
        table.add_column(name, no_wrap=True, overflow="ellipsis",
                         max_width=50 if name == "COMMAND" else None)
    rows = 0
    for s in schedules:
        rows += 1
        job = s.job
        work = job.function if job.kind == "python" else (
            job.command if isinstance(job.command, str) else " ".join(job.command or []))
        next_at = s.next_fire_at.isoformat(timespec="seconds") if s.next_fire_at else "-"
        table.add_row(s.name, s.cron, next_at, s.owner, str(work))
    if rows:
        _console().print(table)
    else:
        info("no schedules")


def _wait_text(job: Job) -> str | None:
    """The wait reason with its detail, in words."""
    d = job.wait_detail or {}
    reason = job.wait_reason
    if not reason:
        return None
    if reason.startswith("host:") and d:
        return (f"{reason}: held by {d.get('holder') or 'nobody'}; "
                f"#{d.get('position')} of {d.get('waiters')} waiting")
    if reason == "priority" and d.get("position"):
        return f"priority: #{d['position']} of {d.get('queued')} in queue {job.queue}"
    if reason == "dependencies" and "unfinished" in d:
        return "dependencies: waiting for " + ", ".join(d["unfinished"])
    if reason == "resources" and d:
        return f"resources: asks {d.get('asks')}, in use {d.get('in_use')}"
    if d.get("due_at"):
        return f"{reason}: due {d['due_at']}"
    return reason


def cancelled(job: Job) -> None:
    if job.state == State.CANCELLED:
        info(f"job {escape(job.id)} cancelled")
    elif job.state.terminal:
        info(f"job {escape(job.id)} had already ended: {job.state}")
    else:
        info(f"job {escape(job.id)} is {job.state}: its worker is stopping it")


def token_created(created: TokenCreated) -> None:
    value(created.token)
    role = "admin " if created.admin else ""
    info(f"[dim]{role}token for {escape(created.user)}: shown once, store it now[/]")


def health(h: Health) -> None:
    mark = {True: "[green]ok[/]", False: "[red]down[/]"}
    style = "green" if h.status == "ok" else "red"
    _console().print(
        f"[{style}]{h.status}[/]  redis {mark[h.redis]}  database {mark[h.database]}"
        f"  version {escape(h.version)}"
    )


# -- tidal up ---------------------------------------------------------------------------


def up_event(message: str) -> None:
    """A line of the supervisor's own log (restarts, shutdown)."""
    stamp = datetime.now().strftime("%H:%M:%S")
    _console(stderr=True).print(f"[dim]{stamp}[/] [bold]tidal up[/] {escape(message)}")


def up_banner(
    url: str, token_paths: Sequence[Path], redis_url: str, logs_dir: Path, workers: int
) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("API", escape(url))
    grid.add_row("dashboard", escape(f"{url}/") + "  ([bold]tidal dashboard[/] opens it signed in)")
    grid.add_row("docs", escape(f"{url}/docs"))
    grid.add_row("token", "written to " + escape(", ".join(str(p) for p in token_paths)))
    grid.add_row("redis", escape(redis_url))
    grid.add_row("workers", str(workers))
    grid.add_row("logs", escape(str(logs_dir)))
    grid.add_row("", "the tidal CLI picks the URL and token up by itself: try "
                 "[bold]tidal submit --follow -- echo hello[/]")
    _console().print(
        Panel(grid, title="Tidal is up", title_align="left", expand=False, border_style="green")
    )
    _console().print("Ctrl-C to stop", style="bold")
