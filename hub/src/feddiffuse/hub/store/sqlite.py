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

from ..settings import FederationSettings
from .base import (
    CLOSED,
    CLOSING,
    OPEN,
    DownloadTotal,
    EventRow,
    FederationRow,
    HubStore,
    NewEvent,
    ParticipantRow,
    RoundRow,
    SegmentFileRow,
    TokenRevoked,
    TokenRow,
    UploadRow,
    VersionRow,
)

# 2: federation.recipe (the training recipe as JSON) and federation.sample_version (the
# recipe's EMA of the global model, which clients sample from; NULL: the global itself).
# 3: participants.removed_at/removed_reason (a revoked participant leaves its round), and
# download_totals (bytes sent per round, client and file) instead of one row per request.
# 4: federation.uplink_codec and downlink_codec (feddiffuse.shared.codecs; before: fp32).
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
    uplink_codec TEXT NOT NULL DEFAULT 'fp32', downlink_codec TEXT NOT NULL DEFAULT 'fp32'
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

    db.execute("BEGIN IMMEDIATE")
    try:
        lr, loss, batch = db.execute("SELECT lr, loss, batch_size FROM federation").fetchone()
        recipe = {**PAPER.to_dict(), "lr": lr, "loss": loss, "batch_size": batch}
        db.execute("ALTER TABLE federation ADD COLUMN recipe TEXT NOT NULL DEFAULT '{}'")
        db.execute("ALTER TABLE federation ADD COLUMN sample_version TEXT")
        db.execute("UPDATE federation SET recipe = ?", (json.dumps(recipe, sort_keys=True),))
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Participants can be removed from a round; downloads are kept as totals."""
    db.execute("BEGIN IMMEDIATE")
    try:
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
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Each direction has a codec; a federation created before codecs sends fp32 both ways."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for column in ("uplink_codec", "downlink_codec"):
            db.execute(f"ALTER TABLE federation ADD COLUMN {column} TEXT NOT NULL "
                       "DEFAULT 'fp32'")
        db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        # The file is made 0600 before SQLite opens it; its WAL and shm files take its mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True,
                         isolation_level=None, check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA busy_timeout=30000")
    return db


def _segs(value: str) -> tuple[str, ...]:
    return tuple(s for s in value.split(",") if s)


class SqliteStore(HubStore):
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
                _MIGRATIONS[int(row[0])](db)
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

    # A read outside a transaction (a transaction reads through its `_Tx`).
    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        return self._reader().execute(sql, args).fetchall()

    def _one(self, sql: str, args: Sequence = ()) -> tuple | None:
        rows = self._reader().execute(sql, args).fetchall()  # ends the read at once
        return rows[0] if rows else None

    # -- the federation ---------------------------------------------------------------------

    def create(self, settings: FederationSettings, initial: VersionRow, admin_token_hash: str,
               now: float) -> None:
        s = settings
        with self._tx() as tx:
            tx.run("INSERT INTO versions VALUES (?, ?, ?, ?)",
                   (initial.version, initial.round, initial.bytes, initial.created_at))
            tx.run("INSERT INTO federation VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, "
                   "NULL, ?, NULL, ?, ?)", (s.name, s.preset, s.method, s.rounds, s.local_epochs,
                                            s.min_clients, s.round_timeout_s, s.seed,
                                            s.batch_size, s.lr, s.loss, now, initial.version,
                                            json.dumps(s.recipe, sort_keys=True),
                                            s.uplink_codec, s.downlink_codec))
            if s.privacy is not None:  # fixed at creation; a key of its own, no new column
                tx.run("INSERT INTO meta VALUES ('privacy', ?)",
                       (json.dumps(s.privacy, sort_keys=True),))
            tx.run("INSERT INTO tokens VALUES ('admin', 'admin', ?, ?, NULL)",
                   (admin_token_hash, now))
            _insert_event(tx, NewEvent(now, None, "created",
                                       f"federation {s.name!r} created"))

    def federation(self) -> FederationRow:
        row = self._one("SELECT name, preset, method, rounds, local_epochs, min_clients, "
                        "round_timeout_s, seed, batch_size, lr, loss, created_at, "
                        "current_round, current_version, finished_at, recipe, sample_version, "
                        "uplink_codec, downlink_codec FROM federation")
        if row is None:
            raise LookupError("the hub database holds no federation")
        (name, preset, method, rounds, local_epochs, min_clients, round_timeout_s, seed,
         batch_size, lr, loss) = row[:11]
        settings = FederationSettings(name, preset, method, rounds, local_epochs, min_clients,
                                      round_timeout_s, seed, batch_size, lr, loss,
                                      recipe=json.loads(row[15]), uplink_codec=row[17],
                                      downlink_codec=row[18], privacy=self._privacy())
        return FederationRow(settings, row[11], row[12], row[13], row[14], row[16])

    def _privacy(self) -> dict | None:
        """The federation's privacy settings (written once, at creation: read once)."""
        if not hasattr(self, "_privacy_read"):
            row = self._one("SELECT value FROM meta WHERE key = 'privacy'")
            self._privacy_read = None if row is None else json.loads(row[0])
        return None if self._privacy_read is None else dict(self._privacy_read)

    # -- tokens -----------------------------------------------------------------------------

    def add_token(self, name: str, role: str, token_hash: str, now: float) -> None:
        try:
            with self._tx() as tx:
                tx.run("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                       (name, role, token_hash, now))
                _insert_event(tx, NewEvent(now, None, "token", f"token {name!r} created"))
        except sqlite3.IntegrityError as exc:
            raise KeyError(name) from exc

    def token_by_hash(self, token_hash: str) -> TokenRow | None:
        row = self._one("SELECT name, role, created_at, revoked_at FROM tokens "
                        "WHERE token_sha256 = ?", (token_hash,))
        return TokenRow(*row) if row else None

    def tokens(self) -> list[TokenRow]:
        return [TokenRow(*r) for r in self._all(
            "SELECT name, role, created_at, revoked_at FROM tokens ORDER BY role, name")]

    def revoke_token(self, name: str, now: float) -> bool:
        with self._tx() as tx:
            n = tx.run("UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                       (now, name)).rowcount
            if n:
                _insert_event(tx, NewEvent(now, None, "token", f"token {name!r} revoked"))
        return bool(n)

    def token(self, name: str) -> TokenRow | None:
        row = self._one("SELECT name, role, created_at, revoked_at FROM tokens WHERE name = ?",
                        (name,))
        return TokenRow(*row) if row else None

    def replace_token_hash(self, name: str, token_hash: str, now: float, event: NewEvent
                           ) -> bool:
        with self._tx() as tx:
            n = tx.run("UPDATE tokens SET token_sha256 = ? WHERE name = ?",
                       (token_hash, name)).rowcount
            if n:
                _insert_event(tx, event)
        return bool(n)

    def enrolled_clients(self) -> list[str]:
        return [r[0] for r in self._all("SELECT name FROM tokens WHERE role = 'client' AND "
                                        "revoked_at IS NULL ORDER BY name")]

    # -- versions ---------------------------------------------------------------------------

    def version(self, version: str) -> VersionRow | None:
        row = self._one("SELECT version, round, bytes, created_at FROM versions "
                        "WHERE version = ?", (version,))
        return VersionRow(*row) if row else None

    def segment_file(self, version: str, segments: str) -> SegmentFileRow | None:
        row = self._one("SELECT version, segments, sha256, bytes FROM segment_files "
                        "WHERE version = ? AND segments = ?", (version, segments))
        return SegmentFileRow(*row) if row else None

    def add_segment_file(self, row: SegmentFileRow) -> None:
        with self._tx() as tx:
            tx.run("INSERT OR IGNORE INTO segment_files VALUES (?, ?, ?, ?)",
                   (row.version, row.segments, row.sha256, row.bytes))

    # -- rounds -----------------------------------------------------------------------------

    _ROUND_COLS = ("round, status, base_version, opened_at, deadline, closing_at, close_reason, "
                   "closed_at, result_version")

    def round(self, round_index: int) -> RoundRow | None:
        row = self._one(f"SELECT {self._ROUND_COLS} FROM rounds WHERE round = ?",
                        (round_index,))
        return RoundRow(*row) if row else None

    def rounds(self) -> list[RoundRow]:
        return [RoundRow(*r) for r in self._all(
            f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round")]

    def open_round(self, row: RoundRow, participants: Sequence[ParticipantRow],
                   event: NewEvent) -> None:
        with self._tx() as tx:
            _insert_round(tx, row, participants)
            _insert_event(tx, event)

    _PARTICIPANT_COLS = "round, client, download, upload, seed, removed_at, removed_reason"

    def participants(self, round_index: int) -> list[ParticipantRow]:
        return [_participant(r) for r in self._all(
            f"SELECT {self._PARTICIPANT_COLS} FROM participants WHERE round = ? "
            "ORDER BY client", (round_index,))]

    def participant(self, round_index: int, client: str) -> ParticipantRow | None:
        row = self._one(f"SELECT {self._PARTICIPANT_COLS} FROM participants "
                        "WHERE round = ? AND client = ?", (round_index, client))
        return _participant(row) if row else None

    def remove_participants(self, round_index: int, clients: Sequence[str], reason: str,
                            now: float, event: NewEvent) -> list[str]:
        removed = []
        with self._tx() as tx:
            status = tx.run("SELECT status FROM rounds WHERE round = ?",
                            (round_index,)).fetchone()
            if status is None or status[0] != OPEN:
                return []
            for client in clients:
                n = tx.run("UPDATE participants SET removed_at = ?, removed_reason = ? WHERE "
                           "round = ? AND client = ? AND removed_at IS NULL AND NOT EXISTS "
                           "(SELECT 1 FROM uploads u WHERE u.round = participants.round AND "
                           "u.client = participants.client)",
                           (now, reason, round_index, client)).rowcount
                if n:
                    removed.append(client)
            if removed:
                _insert_event(tx, event)
        return removed

    def restart_round(self, round_index: int, participants: Sequence[ParticipantRow],
                      deadline: float | None, event: NewEvent) -> None:
        with self._tx() as tx:
            status = tx.run("SELECT status FROM rounds WHERE round = ?",
                            (round_index,)).fetchone()
            if status is None or status[0] != OPEN:
                raise RuntimeError(f"round {round_index} is not open")
            tx.run("UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, round_index))
            for p in participants:
                _insert_participant(tx, p)
            _insert_event(tx, event)

    def participated_before(self, client: str, round_index: int) -> bool:
        return self._one("SELECT 1 FROM participants WHERE client = ? AND round < ? LIMIT 1",
                         (client, round_index)) is not None

    def mark_closing(self, round_index: int, reason: str, now: float, event: NewEvent) -> bool:
        with self._tx() as tx:
            n = tx.run(f"UPDATE rounds SET status = '{CLOSING}', closing_at = ?, "
                       f"close_reason = ? WHERE round = ? AND status = '{OPEN}'",
                       (now, reason, round_index)).rowcount
            if n:
                _insert_event(tx, event)
        return bool(n)

    def set_deadline(self, round_index: int, deadline: float, event: NewEvent) -> None:
        with self._tx() as tx:
            tx.run("UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, round_index))
            _insert_event(tx, event)

    def publish(self, round_index: int, new_version: VersionRow, now: float, finished: bool,
                next_round: tuple[RoundRow, Sequence[ParticipantRow]] | None,
                events: Sequence[NewEvent], sample: VersionRow | None = None,
                segment_files: Sequence[SegmentFileRow] = ()) -> None:
        v = new_version
        with self._tx() as tx:
            status = tx.run("SELECT status FROM rounds WHERE round = ?",
                            (round_index,)).fetchone()
            if status is None or status[0] != CLOSING:
                raise RuntimeError(f"round {round_index} is not closing")
            tx.run("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)",
                   (v.version, v.round, v.bytes, v.created_at))
            for f in segment_files:
                tx.run("INSERT OR IGNORE INTO segment_files VALUES (?, ?, ?, ?)",
                       (f.version, f.segments, f.sha256, f.bytes))
            tx.run(f"UPDATE rounds SET status = '{CLOSED}', closed_at = ?, result_version = ? "
                   "WHERE round = ?", (now, v.version, round_index))
            if sample is not None:
                tx.run("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)",
                       (sample.version, sample.round, sample.bytes, sample.created_at))
                tx.run("UPDATE federation SET sample_version = ?", (sample.version,))
            if finished:
                tx.run("UPDATE federation SET current_version = ?, finished_at = ?",
                       (v.version, now))
            else:
                tx.run("UPDATE federation SET current_version = ?, current_round = ?",
                       (v.version, round_index + 1))
            if next_round is not None:
                _insert_round(tx, *next_round)
            for e in events:
                _insert_event(tx, e)

    # -- uploads and downloads --------------------------------------------------------------

    _UPLOAD_COLS = "round, client, sha256, bytes, num_samples, mean_loss, segments, received_at"

    def upload(self, round_index: int, client: str) -> UploadRow | None:
        row = self._one(f"SELECT {self._UPLOAD_COLS} FROM uploads WHERE round = ? AND "
                        "client = ?", (round_index, client))
        return _upload(row) if row else None

    def uploads(self, round_index: int) -> list[UploadRow]:
        return [_upload(r) for r in self._all(
            f"SELECT {self._UPLOAD_COLS} FROM uploads WHERE round = ? ORDER BY client",
            (round_index,))]

    def add_upload(self, row: UploadRow, event: NewEvent) -> bool:
        try:
            with self._tx() as tx:
                active = tx.run("SELECT 1 FROM tokens WHERE name = ? AND revoked_at IS NULL",
                                (row.client,)).fetchone()
                if active is None:
                    raise TokenRevoked(row.client)
                tx.run("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.round, row.client, row.sha256, row.bytes, row.num_samples,
                        row.mean_loss, ",".join(row.segments), row.received_at))
                _insert_event(tx, event)
        except sqlite3.IntegrityError:
            return False
        return True

    def add_downloads(self, totals: Sequence[DownloadTotal]) -> None:
        if not totals:
            return
        with self._tx() as tx:
            for t in totals:
                tx.run("INSERT INTO download_totals VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT "
                       "(round, client, version, segments) DO UPDATE SET "
                       "requests = requests + excluded.requests, bytes = bytes + excluded.bytes",
                       (t.round, t.client, t.version, t.segments, t.requests, t.bytes))

    def bytes_out(self) -> dict[int, int]:
        return dict(self._all("SELECT round, SUM(bytes) FROM download_totals GROUP BY round"))

    # -- events and housekeeping ------------------------------------------------------------

    def add_event(self, event: NewEvent) -> None:
        with self._tx() as tx:
            _insert_event(tx, event)

    def events(self, limit: int = 100) -> list[EventRow]:
        rows = self._all("SELECT id, at, round, kind, message FROM events ORDER BY id DESC "
                         "LIMIT ?", (limit,))
        return [EventRow(*r) for r in reversed(rows)]

    def referenced_blobs(self) -> set[str]:
        out: set[str] = set()
        for sql in ("SELECT version FROM versions", "SELECT sha256 FROM segment_files",
                    "SELECT sha256 FROM uploads"):
            out.update(r[0] for r in self._all(sql))
        return out

    def is_referenced(self, sha256: str) -> bool:
        return self._one("SELECT 1 FROM versions WHERE version = ?1 UNION ALL SELECT 1 FROM "
                         "segment_files WHERE sha256 = ?1 UNION ALL SELECT 1 FROM uploads WHERE "
                         "sha256 = ?1 LIMIT 1", (sha256,)) is not None

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


def _insert_round(tx: _Tx, row: RoundRow, participants: Sequence[ParticipantRow]) -> None:
    tx.run("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           (row.round, row.status, row.base_version, row.opened_at, row.deadline,
            row.closing_at, row.close_reason, row.closed_at, row.result_version))
    for p in participants:
        _insert_participant(tx, p)


def _insert_participant(tx: _Tx, p: ParticipantRow) -> None:
    tx.run("INSERT INTO participants VALUES (?, ?, ?, ?, ?, ?, ?)",
           (p.round, p.client, ",".join(p.download), ",".join(p.upload), p.seed,
            p.removed_at, p.removed_reason))


def _insert_event(tx: _Tx, e: NewEvent) -> None:
    tx.run("INSERT INTO events (at, round, kind, message) VALUES (?, ?, ?, ?)",
           (e.at, e.round, e.kind, e.message))


def _participant(row: tuple) -> ParticipantRow:
    return ParticipantRow(row[0], row[1], _segs(row[2]), _segs(row[3]), row[4], row[5], row[6])


def _upload(row: tuple) -> UploadRow:
    return UploadRow(row[0], row[1], row[2], row[3], row[4], row[5], _segs(row[6]), row[7])
