"""Alembic migrations of the log database, shipped with the package and run by ``Database.migrate``."""
