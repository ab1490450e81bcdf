"""Alembic environment. ``Database.migrate`` hands over its own connection (with the
SQLite pragmas applied and a transaction open); the ``alembic`` command line works
too with ``-x url=...`` or ``DSKI_DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context
from storage.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs table copies for ALTER
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DSKI_DATABASE_URL")
    if not url:
        raise SystemExit("no database: pass -x url=... or set DSKI_DATABASE_URL")
    from storage.database import Database

    db = Database(url)  # same pragmas and BEGIN IMMEDIATE as the node
    try:
        with db.engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        db.dispose()


def run_migrations_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DSKI_DATABASE_URL")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
