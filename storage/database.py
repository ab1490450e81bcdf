"""Engine, sessions and schema migrations of the log database.

SQLite (the default) is opened in WAL mode with ``synchronous=FULL``: the listener
acknowledges a C-STORE only after the row is committed, so a commit must survive a
power cut. Write transactions start with ``BEGIN IMMEDIATE`` so that two writers
queue on the busy timeout instead of failing when a read lock cannot be upgraded.
PostgreSQL works unchanged (``postgresql+psycopg://...``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from storage.errors import DatabaseUnavailableError

__all__ = ["Database", "DatabaseUnavailableError", "MIGRATIONS_DIR"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "dski_sqlite_begin"
# PostgreSQL advisory lock key serialising concurrent migrate() calls ("DSKI" in ASCII).
_MIGRATE_LOCK = 0x44534B49
_WAL_SWITCH_RETRY_SECONDS = 0.01


class Database:
    """One engine per process; ``session()`` for writes, ``read_session()`` for queries."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._safe_url = parsed.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {"echo": echo}
        # SQLite busy timeout: how long a write waits for another writer's lock before the
        # store is refused with out-of-resources. ``?timeout=SECONDS`` in the URL (the
        # pysqlite parameter SQLAlchemy documents) overrides the default.
        self.busy_timeout_ms = BUSY_TIMEOUT_MS
        if self.is_sqlite and "timeout" in parsed.query:
            raw = parsed.query["timeout"]
            seconds = float(raw[-1] if isinstance(raw, tuple) else raw)
            if not seconds > 0:
                raise ValueError(f"database_url: timeout must be a positive number of seconds, got {raw!r}")
            self.busy_timeout_ms = int(seconds * 1000)
        if self.is_sqlite:
            database = parsed.database or ""
            memory = database in ("", ":memory:") or "mode=memory" in str(parsed.query)
            connect_args: dict[str, Any] = {"timeout": self.busy_timeout_ms / 1000, "check_same_thread": False}
            if memory:
                kwargs["poolclass"] = StaticPool  # one shared connection, or each one sees its own empty DB
            elif not database.startswith("file:"):
                Path(database).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = connect_args
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            self._install_sqlite_hooks(self.engine, self.busy_timeout_ms)
        self._read_engine = self.engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(bind=self._read_engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    def __repr__(self) -> str:
        return f"Database({self._safe_url!r})"

    @staticmethod
    def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control away from the sqlite3 module; "begin" below issues BEGIN.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                _switch_to_wal(cursor, busy_timeout_ms / 1000)
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute("PRAGMA foreign_keys=ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

    # -- sessions ------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error.

        ``OperationalError`` (cannot connect, locked past the busy timeout, disk full)
        becomes ``DatabaseUnavailableError``.
        """
        with self._guard():
            with self._sessions() as session:
                with session.begin():
                    yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only transaction (SQLite: deferred, so it never blocks writers); always rolled back."""
        with self._guard():
            with self._read_sessions() as session:
                try:
                    yield session
                finally:
                    session.rollback()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            logger.error("database unavailable", extra={"database": self._safe_url, "error": reason})
            raise DatabaseUnavailableError(self._safe_url, reason) from exc

    # -- schema --------------------------------------------------------------

    def alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["configure_logging"] = False
        return cfg

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (default: newest) with the shipped Alembic migrations.

        Safe to call on every start and from several processes at once: SQLite
        serialises on BEGIN IMMEDIATE, PostgreSQL on an advisory lock.
        """
        cfg = self.alembic_config()
        with self._guard():
            with self.engine.begin() as conn:
                if self.is_postgresql:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        logger.info("database schema up to date", extra={"database": self._safe_url, "revision": self.current_revision()})

    def current_revision(self) -> str | None:
        with self._guard():
            with self._read_engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def _switch_to_wal(cursor: sqlite3.Cursor, timeout_seconds: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock it needs.

    Switching a new database file to WAL takes an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler (which could deadlock there),
    when two connections switch the same new file together: several node or receiver
    processes, or CLI commands, opening a fresh database at the same moment. Once the
    file is in WAL mode the pragma only reads the mode, so this retries only that first race.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_WAL_SWITCH_RETRY_SECONDS)
