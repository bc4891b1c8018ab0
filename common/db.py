"""The SQL mirror's engine: SQLite in WAL mode under the data dir by default
(TIDAL_DATABASE_URL may point elsewhere, e.g. PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import SQLModel, create_engine

from common import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from common.settings import Settings


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(settings: Settings, *, create: bool = True) -> Engine:
    url = settings.sqlalchemy_url()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    if create:
        _create_tables(engine)
        add_missing_columns(engine)
    return engine


def _create_tables(engine: Engine, tries: int = 5) -> None:
    """create_all checks for each table, then CREATE TABLE: the API and the scheduler
    starting together against a fresh SQLite file race between the two, and the loser
    gets "table … already exists" (or, while the other turns the file to WAL, "database
    is locked"). Try again: the check then finds the table."""
    for attempt in range(1, tries + 1):
        try:
            SQLModel.metadata.create_all(engine)
            return
        except OperationalError as exc:
            transient = "already exists" in str(exc) or "database is locked" in str(exc)
            if not transient or attempt == tries:
                raise
            time.sleep(0.05 * attempt)


def add_missing_columns(engine: Engine) -> list[str]:
    """There are no migrations (create_all makes missing tables, never missing columns):
    add the nullable columns a newer version declares to tables an older one created, so an
    old database keeps working. Returns the "table.column" names added."""
    added = []
    inspector = inspect(engine)
    existing_tables = set(inspector.get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            ddl = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(
                        f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {ddl}')
                added.append(f"{table.name}.{column.name}")
            except SQLAlchemyError:  # another process added it first
                fresh = {c["name"] for c in inspect(engine).get_columns(table.name)}
                if column.name not in fresh:
                    raise
    return added
