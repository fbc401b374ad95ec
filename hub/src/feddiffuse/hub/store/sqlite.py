"""The SQLite implementation of HubStore: one file, WAL journal, synchronous=FULL.

WAL lets the admin CLI (token create, status) read and write while `serve` runs; FULL makes
a committed transaction survive a power cut, not only a killed process. Writes go through one
connection behind a lock; every public method is one transaction. Reads outside a transaction
use one connection per thread, so that a manifest never waits behind an upload's fsync (WAL
readers see every committed transaction and do not block the writer).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .base import CLOSED, CLOSING, OPEN
from .sql import SqlStore

# 2: federation.recipe (the training recipe as JSON) and federation.sample_version (the
# recipe's EMA of the global model, which clients sample from; NULL: the global itself).
# 3: participants.removed_at/removed_reason (a revoked participant leaves its round), and
# download_totals (bytes sent per round, client and file) instead of one row per request.
# 4: federation.uplink_codec and downlink_codec (feddiffuse.shared.codecs; before: fp32), and
# federation.privacy (the DP settings as JSON; NULL: not private).
SCHEMA_VERSION = 4

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
CREATE TABLE federation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL, preset TEXT NOT NULL, method TEXT NOT NULL,
    rounds INTEGER NOT NULL, local_epochs INTEGER NOT NULL, min_clients INTEGER NOT NULL,
    round_timeout_s REAL, seed INTEGER NOT NULL, batch_size INTEGER NOT NULL,
    lr REAL NOT NULL, loss TEXT NOT NULL,
    created_at REAL NOT NULL, current_round INTEGER NOT NULL, current_version TEXT NOT NULL,
    finished_at REAL,
    recipe TEXT NOT NULL, sample_version TEXT,
    uplink_codec TEXT NOT NULL DEFAULT 'fp32', downlink_codec TEXT NOT NULL DEFAULT 'fp32',
    privacy TEXT
);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('admin', 'client')),
    token_sha256 TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL
);
CREATE TABLE versions (
    version TEXT PRIMARY KEY, round INTEGER NOT NULL, bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE segment_files (
    version TEXT NOT NULL REFERENCES versions(version), segments TEXT NOT NULL,
    sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (version, segments)
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('{OPEN}', '{CLOSING}', '{CLOSED}')),
    base_version TEXT NOT NULL REFERENCES versions(version),
    opened_at REAL NOT NULL, deadline REAL, closing_at REAL, close_reason TEXT,
    closed_at REAL, result_version TEXT REFERENCES versions(version)
);
CREATE TABLE participants (
    round INTEGER NOT NULL REFERENCES rounds(round), client TEXT NOT NULL,
    download TEXT NOT NULL, upload TEXT NOT NULL, seed INTEGER NOT NULL,
    removed_at REAL, removed_reason TEXT,
    PRIMARY KEY (round, client)
);
CREATE TABLE uploads (
    round INTEGER NOT NULL, client TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, num_samples INTEGER NOT NULL, mean_loss REAL,
    segments TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, client), FOREIGN KEY (round, client) REFERENCES participants
);
CREATE TABLE download_totals (
    round INTEGER NOT NULL, client TEXT NOT NULL, version TEXT NOT NULL,
    segments TEXT NOT NULL, requests INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (round, client, version, segments)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, round INTEGER, kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Schema 1 had no recipe: such a hub trained with the paper's recipe and its lr/loss."""
    from feddiffuse.shared.recipes import PAPER

    lr, loss, batch = db.execute("SELECT lr, loss, batch_size FROM federation").fetchone()
    recipe = {**PAPER.to_dict(), "lr": lr, "loss": loss, "batch_size": batch}
    db.execute("ALTER TABLE federation ADD COLUMN recipe TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE federation ADD COLUMN sample_version TEXT")
    db.execute("UPDATE federation SET recipe = ?", (json.dumps(recipe, sort_keys=True),))


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Participants can be removed from a round; downloads are kept as totals."""
    db.execute("ALTER TABLE participants ADD COLUMN removed_at REAL")
    db.execute("ALTER TABLE participants ADD COLUMN removed_reason TEXT")
    db.execute("CREATE TABLE download_totals (round INTEGER NOT NULL, client TEXT NOT "
               "NULL, version TEXT NOT NULL, segments TEXT NOT NULL, requests INTEGER NOT "
               "NULL, bytes INTEGER NOT NULL, PRIMARY KEY (round, client, version, "
               "segments))")
    db.execute("INSERT INTO download_totals SELECT round, client, version, segments, "
               "COUNT(*), SUM(bytes) FROM downloads GROUP BY round, client, version, "
               "segments")
    db.execute("DROP TABLE downloads")


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Each direction has a codec (a federation created before codecs sends fp32 both ways),
    and a federation may be private (one created before had no DP)."""
    for column in ("uplink_codec", "downlink_codec"):
        db.execute(f"ALTER TABLE federation ADD COLUMN {column} TEXT NOT NULL "
                   "DEFAULT 'fp32'")
    db.execute("ALTER TABLE federation ADD COLUMN privacy TEXT")


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Schema `version` to the next, in one transaction with its version bump."""
    db.execute("BEGIN IMMEDIATE")
    try:
        _MIGRATIONS[version](db)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                   (str(version + 1),))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        # The file is made 0600 before SQLite opens it; its WAL and shm files take its mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True,
                         isolation_level=None, check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA busy_timeout=30000")
    return db


class SqliteStore(SqlStore):
    _integrity_errors = sqlite3.IntegrityError

    def __init__(self, connection: sqlite3.Connection, path: Path | None = None) -> None:
        self._db = connection
        self._lock = threading.RLock()
        self._path = path
        self._local = threading.local()  # this thread's read connection
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, path: str | Path, *, create: bool = False) -> SqliteStore:
        path = Path(path)
        if create and path.exists():
            raise FileExistsError(path)
        if not create and not path.is_file():
            raise FileNotFoundError(path)
        db = _connect(path, create=create)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        store = cls(db, path)
        if create:
            with store._tx() as tx:
                tx.executescript_parts(_SCHEMA)
        else:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            while row is not None and int(row[0]) in _MIGRATIONS:
                _migrate(db, int(row[0]))
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                 ).fetchone()
            if row is None or int(row[0]) != SCHEMA_VERSION:
                db.close()
                raise ValueError(f"{path} has hub schema {row and row[0]}, this hub reads "
                                 f"{SCHEMA_VERSION}")
        return store

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (the write connection if the store has no path)."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self._path is None:
                return self._db
            db = _connect(self._path, create=False)
            db.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                if self._closed:
                    db.close()
                    raise sqlite3.ProgrammingError("the store is closed")
                self._readers.append(db)
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[_Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # A read outside a transaction (a transaction reads through its `_Tx`); fetchall() ends
    # the read at once.
    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        return self._reader().execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()


class _Tx:
    """The open transaction a `with store._tx()` block writes through."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def run(self, sql: str, args: Sequence = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executescript_parts(self, script: str) -> None:
        # executescript() would COMMIT the open transaction; run the statements one by one.
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)
