"""The PostgreSQL implementation of HubStore (psycopg 3), for several hub replicas on one
database.

The statements are the SQLite store's (`sql.py`); what differs is how they run:

- Every write transaction first takes one transaction-scoped advisory lock
  (`pg_advisory_xact_lock(WRITE_LOCK)`), so that writes are serialised across every replica
  exactly as SQLite's single writer serialises them (`BEGIN IMMEDIATE`): a check and the
  write that depends on it (a token still active, a round still open) are one step for the
  whole cluster. Each write is a handful of rows; reads take no lock.
- Connections come from a pool (psycopg_pool), in autocommit for reads.
- The round lifecycle runs in one replica at a time, the holder of `PostgresLease` (a
  session-level advisory lock on a connection of its own: PostgreSQL frees it when that
  process dies and its connection drops).

The password never appears in the store URL (an admin gives PGPASSWORD, a ~/.pgpass or a
libpq service file); `describe()` shows the URL without one.

Schema versions (`meta.schema_version`): 4 is the SQLite store's schema 4 (with the codecs
and the privacy settings), in PostgreSQL types (DOUBLE PRECISION times, BIGINT counts, an
identity column for events). A PostgreSQL hub is made at 4; `migrate` first brings an older
SQLite hub to 4.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from feddiffuse.shared.errors import UserError

from .base import CLOSED, CLOSING, OPEN
from .sql import TABLES, SqlStore

SCHEMA_VERSION = 4
WRITE_LOCK = 0x0FEDD1FF0001  # advisory lock keys, per database (one federation per database)
LEASE_LOCK = 0x0FEDD1FF0002
POOL_SIZE = 16
LEASE_CHECK_S = 0.5  # how often a replica checks, or tries to take, the lifecycle lease
# A replica's lease connection whose peer vanished (a machine gone, not a process killed:
# then the kernel closes it at once) is dropped after about this long.
_KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 15000}

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
CREATE TABLE federation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL, preset TEXT NOT NULL, method TEXT NOT NULL,
    rounds INTEGER NOT NULL, local_epochs INTEGER NOT NULL, min_clients INTEGER NOT NULL,
    round_timeout_s DOUBLE PRECISION, seed BIGINT NOT NULL, batch_size INTEGER NOT NULL,
    lr DOUBLE PRECISION NOT NULL, loss TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, current_round INTEGER NOT NULL,
    current_version TEXT NOT NULL, finished_at DOUBLE PRECISION,
    recipe TEXT NOT NULL, sample_version TEXT,
    uplink_codec TEXT NOT NULL DEFAULT 'fp32', downlink_codec TEXT NOT NULL DEFAULT 'fp32',
    privacy TEXT
);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('admin', 'client')),
    token_sha256 TEXT NOT NULL UNIQUE, created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE TABLE versions (
    version TEXT PRIMARY KEY, round INTEGER NOT NULL, bytes BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE segment_files (
    version TEXT NOT NULL REFERENCES versions(version), segments TEXT NOT NULL,
    sha256 TEXT NOT NULL, bytes BIGINT NOT NULL, PRIMARY KEY (version, segments)
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('{OPEN}', '{CLOSING}', '{CLOSED}')),
    base_version TEXT NOT NULL REFERENCES versions(version),
    opened_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION,
    closing_at DOUBLE PRECISION, close_reason TEXT, closed_at DOUBLE PRECISION,
    result_version TEXT REFERENCES versions(version)
);
CREATE TABLE participants (
    round INTEGER NOT NULL REFERENCES rounds(round), client TEXT NOT NULL,
    download TEXT NOT NULL, upload TEXT NOT NULL, seed BIGINT NOT NULL,
    removed_at DOUBLE PRECISION, removed_reason TEXT,
    PRIMARY KEY (round, client)
);
CREATE TABLE uploads (
    round INTEGER NOT NULL, client TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL, num_samples BIGINT NOT NULL, mean_loss DOUBLE PRECISION,
    segments TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round, client), FOREIGN KEY (round, client) REFERENCES participants
);
CREATE INDEX uploads_by_sha256 ON uploads (sha256);
CREATE INDEX segment_files_by_sha256 ON segment_files (sha256);
CREATE TABLE download_totals (
    round INTEGER NOT NULL, client TEXT NOT NULL, version TEXT NOT NULL,
    segments TEXT NOT NULL, requests BIGINT NOT NULL, bytes BIGINT NOT NULL,
    PRIMARY KEY (round, client, version, segments)
);
CREATE TABLE events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL,
    round INTEGER, kind TEXT NOT NULL, message TEXT NOT NULL
);
"""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """`url` as it may be shown: host, port and database, never a password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def check_url(url: str) -> str:
    """A store URL an admin gave; UserError (one sentence) if unfit."""
    if not is_postgres_url(url):
        raise UserError(f"--store takes a postgresql://USER@HOST:PORT/DATABASE URL, not "
                        f"{url[:80]!r}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UserError("The --store URL is malformed; give postgresql://USER@HOST:PORT/"
                        "DATABASE.") from None
    if parts.password is not None:
        raise UserError("Leave the password out of the --store URL (command lines and config "
                        "files are readable by others): set PGPASSWORD, or use ~/.pgpass or a "
                        "libpq service file.")
    if not parts.path.strip("/") and "service=" not in parts.query:
        raise UserError("The --store URL names no database; give postgresql://USER@HOST:PORT/"
                        "DATABASE.")
    return url


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The shared statements' `?` placeholders as psycopg's `%s`."""
    return sql.replace("%", "%%").replace("?", "%s")


def _unreachable(url: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"Cannot use the PostgreSQL database {describe(url)}: {first[:300]}. "
                     "Check the URL, that the server runs, and the password (PGPASSWORD, "
                     "~/.pgpass or a service file).")


class PostgresStore(SqlStore):
    def __init__(self, url: str, pool: Any) -> None:
        import psycopg

        self._integrity_errors = psycopg.IntegrityError
        self.url = url
        self._pool = pool

    @classmethod
    def connect(cls, url: str, *, create: bool = False) -> PostgresStore:
        import psycopg
        from psycopg_pool import ConnectionPool

        check_url(url)
        try:  # one plain connection first: a wrong URL or password is one sentence, at once
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as probe:
                tables = {r[0] for r in probe.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
                if create:
                    if tables & ({"meta"} | set(TABLES)):
                        raise UserError(f"The database {describe(url)} holds a hub already; "
                                        "give an empty database.")
                    with probe.transaction():
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                probe.execute(statement)
                elif "meta" not in tables:
                    raise UserError(f"There is no hub in the database {describe(url)}; create "
                                    "one with `feddiffuse-hub init DIR --store URL ...`.")
                else:
                    row = probe.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                        ).fetchone()
                    if row is None or int(row[0]) != SCHEMA_VERSION:
                        raise ValueError(f"{describe(url)} has hub schema {row and row[0]}, "
                                         f"this hub reads {SCHEMA_VERSION}")
        except psycopg.Error as exc:
            raise _unreachable(url, exc) from None
        pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, open=False,
                              kwargs={"autocommit": True, "connect_timeout": 10})
        try:
            pool.open(wait=True, timeout=30)
        except Exception as exc:
            pool.close()
            raise _unreachable(url, exc) from None
        return cls(url, pool)

    @contextmanager
    def _tx(self) -> Iterator[_PgTx]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _PgTx(conn)

    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._pool.connection() as conn:
            return conn.execute(_pg(sql), tuple(args)).fetchall()

    def load(self, tables: Iterator[tuple[str, tuple[str, ...], list[tuple]]]) -> int:
        """Copy rows (`SqlStore.dump` of another store) into this empty store, in one
        transaction; returns the number of rows."""
        count = 0
        with self._tx() as tx:
            for table, columns, rows in tables:
                if table == "federation":
                    tx.run("DELETE FROM federation")
                marks = ", ".join("?" * len(columns))
                for row in rows:
                    tx.run(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", row)
                    count += 1
            tx.run("SELECT setval(pg_get_serial_sequence('events', 'id'), "
                   "COALESCE((SELECT MAX(id) FROM events), 0) + 1, false)")
        return count

    def lease(self) -> PostgresLease:
        return PostgresLease(self.url)

    def close(self) -> None:
        self._pool.close()


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def run(self, sql: str, args: Sequence = ()) -> Any:
        return self._conn.execute(_pg(sql), tuple(args))


class PostgresLease:
    """Who runs the round lifecycle: the replica holding a session advisory lock, on a
    connection of its own. `held()` answers from the last check; `refresh()` checks (at most
    every LEASE_CHECK_S): the holder that its connection still lives, the others whether they
    can take the lock (free when the holder's process died: its connection dropped)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._held = False
        self._checked = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def held(self) -> bool:
        return self._held

    def refresh(self) -> bool:
        import psycopg

        with self._lock:
            now = time.monotonic()
            if self._closed or now - self._checked < LEASE_CHECK_S:
                return self._held
            self._checked = now
            try:
                if self._conn is None or self._conn.closed:
                    self._held = False
                    self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                                 **_KEEPALIVE)
                if self._held:
                    self._conn.execute("SELECT 1")
                else:
                    row = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                             (LEASE_LOCK,)).fetchone()
                    self._held = bool(row and row[0])
            except psycopg.Error:
                self._held = False
                self._drop()
            return self._held

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a connection already broken
                pass
            self._conn = None

    def release(self) -> None:
        with self._lock:
            self._closed = True
            self._held = False
            self._drop()
