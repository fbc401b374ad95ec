"""The hub's store: an abstract interface and its SQLite and PostgreSQL implementations."""

from pathlib import Path

from .base import CLOSED, CLOSING, OPEN, HubStore
from .sqlite import SqliteStore


def open_store(location: str | Path, *, create: bool = False) -> HubStore:
    """The store at `location`: a postgresql:// URL, else the path of a SQLite file."""
    if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore  # psycopg: only with the `scale` extra

        return PostgresStore.connect(location, create=create)
    return SqliteStore.connect(location, create=create)


__all__ = ["CLOSED", "CLOSING", "OPEN", "HubStore", "SqliteStore", "open_store"]
