"""The hub's store: an abstract interface and its SQLite implementation."""

from pathlib import Path

from .base import CLOSED, CLOSING, OPEN, HubStore
from .sqlite import SqliteStore


def open_store(path: str | Path, *, create: bool = False) -> HubStore:
    """The store at `path` (the factory a PostgreSQL store would be chosen in)."""
    return SqliteStore.connect(path, create=create)


__all__ = ["CLOSED", "CLOSING", "OPEN", "HubStore", "SqliteStore", "open_store"]
