"""`tidal doctor`: compare Redis with itself and with the SQL mirror (common/doctor.py).

An operator command like `tidal scheduler`: it talks to Redis and SQL directly, with the
same settings (TIDAL_*, --redis-url, or the cli.json of `tidal up`). Exit 0 when nothing
is found (after --fix: nothing is left), 1 otherwise.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli import output
from cli.options import JsonOpt, RedisUrlOpt
from common.errors import RedisUnavailable

if TYPE_CHECKING:  # imported when the command runs, so other commands start fast
    from common.doctor import Finding, RestoreReport


def doctor(
    fix: Annotated[
        bool, typer.Option("--fix", help="Repair what is safe to repair, then check again.")
    ] = False,
    restore: Annotated[
        bool,
        typer.Option("--restore", help="After Redis lost its data: resubmit every unfinished "
                     "job of the SQL mirror, with its id, so it runs again."),
    ] = False,
    as_json: JsonOpt = False,
    redis_url: RedisUrlOpt = None,
) -> None:
    """Check that Redis and the SQL mirror agree; --fix repairs, --restore rebuilds."""
    import redis

    from cli.main import service_settings  # not at import: cli.main imports this module
    from common.db import make_engine
    from common.doctor import Doctor
    from common.keys import Keys
    from common.redis import connect
    from scheduler.recorder import Recorder

    settings = service_settings(redis_url)
    client = connect(settings.redis_url)
    engine = make_engine(settings)
    try:
        doc = Doctor(client, Keys(settings.prefix), settings, engine,
                     Recorder(settings, client, engine).catch_up)
        restored = doc.restore() if restore else None
        findings = doc.examine()
        fixed = doc.repair(findings) if fix and findings else 0
        if fixed:
            findings = doc.examine()
    except redis.RedisError as exc:
        raise RedisUnavailable(f"cannot use Redis at {settings.redis_url}: {exc}") from exc
    finally:
        client.close()
        engine.dispose()
    _show(findings, fixed, restored, as_json)
    if findings:
        raise typer.Exit(1)


def _show(findings: list[Finding], fixed: int, restored: RestoreReport | None,
          as_json: bool) -> None:
    if as_json:
        doc: dict[str, Any] = {
            "findings": [{k: v for k, v in asdict(f).items() if k != "data"} for f in findings],
            "fixed": fixed,
            "restored": asdict(restored) if restored else None,
        }
        output.json(doc)
        return
    if restored is not None:
        output.info(f"restore: {restored.restored} of {restored.candidates} unfinished jobs "
                    f"resubmitted ({restored.present} already in Redis, {restored.unreadable} "
                    "unreadable)")
    if fixed:
        output.info(f"fixed {fixed}")
    if not findings:
        output.info("no findings: Redis and the mirror agree")
        return
    table = Table("check", "subject", "detail", "fix", title=f"{len(findings)} findings")
    for f in findings:
        table.add_row(f.check, f.subject, f.detail, "--fix" if f.fixable else "")
    Console().print(table)
