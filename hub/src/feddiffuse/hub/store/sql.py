"""The SQL of the hub's store, shared by its SQLite and PostgreSQL implementations.

Every public method is one transaction (`_tx`); reads outside a transaction go through
`_one` and `_all`. The statements are written once, with `?` placeholders, in the SQL that
both databases read alike (`ON CONFLICT`, `CAST(... AS BIGINT)`); an implementation supplies
the connections, the transactions and the exception its driver raises for a broken
constraint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

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
    RoundNotOpen,
    RoundRow,
    SegmentFileRow,
    TokenRevoked,
    TokenRow,
    UploadRow,
    VersionRow,
)

# The tables, in the order their rows can be copied (a reference follows what it refers to),
# with their columns in the order both schemas declare them.
TABLES: dict[str, tuple[str, ...]] = {
    "federation": ("id", "name", "preset", "method", "rounds", "local_epochs", "min_clients",
                   "round_timeout_s", "seed", "batch_size", "lr", "loss", "created_at",
                   "current_round", "current_version", "finished_at", "recipe",
                   "sample_version", "uplink_codec", "downlink_codec", "privacy"),
    "tokens": ("name", "role", "token_sha256", "created_at", "revoked_at"),
    "versions": ("version", "round", "bytes", "created_at"),
    "segment_files": ("version", "segments", "sha256", "bytes"),
    "rounds": ("round", "status", "base_version", "opened_at", "deadline", "closing_at",
               "close_reason", "closed_at", "result_version"),
    "participants": ("round", "client", "download", "upload", "seed", "removed_at",
                     "removed_reason"),
    "uploads": ("round", "client", "sha256", "bytes", "num_samples", "mean_loss", "segments",
                "received_at"),
    "download_totals": ("round", "client", "version", "segments", "requests", "bytes"),
    "events": ("id", "at", "round", "kind", "message"),
}


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """The open transaction a `with store._tx()` block writes through."""

    def run(self, sql: str, args: Sequence = ()) -> Cursor: ...


def _segs(value: str) -> tuple[str, ...]:
    return tuple(s for s in value.split(",") if s)


class SqlStore(HubStore):
    """The hub's store over a SQL database; subclasses connect."""

    _integrity_errors: type[Exception] | tuple[type[Exception], ...] = ()

    def _tx(self) -> AbstractContextManager[Any]:  # yields a Tx
        raise NotImplementedError

    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        raise NotImplementedError

    def _one(self, sql: str, args: Sequence = ()) -> tuple | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def dump(self) -> Iterator[tuple[str, tuple[str, ...], list[tuple]]]:
        """Every row of every table, table by table (for `feddiffuse-hub migrate`)."""
        for table, columns in TABLES.items():
            yield table, columns, self.dump_table(table, columns)

    def dump_table(self, table: str, columns: tuple[str, ...]) -> list[tuple]:
        return self._all(f"SELECT {', '.join(columns)} FROM {table} ORDER BY "
                         f"{', '.join(columns[:2])}")

    # -- the federation ---------------------------------------------------------------------

    def create(self, settings: FederationSettings, initial: VersionRow, admin_token_hash: str,
               now: float) -> None:
        s = settings
        with self._tx() as tx:
            tx.run("INSERT INTO versions VALUES (?, ?, ?, ?)",
                   (initial.version, initial.round, initial.bytes, initial.created_at))
            privacy = None if s.privacy is None else json.dumps(s.privacy, sort_keys=True)
            tx.run("INSERT INTO federation VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, "
                   "NULL, ?, NULL, ?, ?, ?)", (s.name, s.preset, s.method, s.rounds,
                                               s.local_epochs, s.min_clients, s.round_timeout_s,
                                               s.seed, s.batch_size, s.lr, s.loss, now,
                                               initial.version,
                                               json.dumps(s.recipe, sort_keys=True),
                                               s.uplink_codec, s.downlink_codec, privacy))
            tx.run("INSERT INTO tokens VALUES ('admin', 'admin', ?, ?, NULL)",
                   (admin_token_hash, now))
            _insert_event(tx, NewEvent(now, None, "created",
                                       f"federation {s.name!r} created"))

    def federation(self) -> FederationRow:
        row = self._one("SELECT name, preset, method, rounds, local_epochs, min_clients, "
                        "round_timeout_s, seed, batch_size, lr, loss, created_at, "
                        "current_round, current_version, finished_at, recipe, sample_version, "
                        "uplink_codec, downlink_codec, privacy FROM federation")
        if row is None:
            raise LookupError("the hub database holds no federation")
        (name, preset, method, rounds, local_epochs, min_clients, round_timeout_s, seed,
         batch_size, lr, loss) = row[:11]
        settings = FederationSettings(name, preset, method, rounds, local_epochs, min_clients,
                                      round_timeout_s, seed, batch_size, lr, loss,
                                      recipe=json.loads(row[15]), uplink_codec=row[17],
                                      downlink_codec=row[18],
                                      privacy=None if row[19] is None else json.loads(row[19]))
        return FederationRow(settings, row[11], row[12], row[13], row[14], row[16])

    # -- tokens -----------------------------------------------------------------------------

    def add_token(self, name: str, role: str, token_hash: str, now: float) -> None:
        try:
            with self._tx() as tx:
                tx.run("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                       (name, role, token_hash, now))
                _insert_event(tx, NewEvent(now, None, "token", f"token {name!r} created"))
        except self._integrity_errors as exc:
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
            tx.run("INSERT INTO segment_files VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            tx.run("INSERT INTO versions VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                   (v.version, v.round, v.bytes, v.created_at))
            for f in segment_files:
                tx.run("INSERT INTO segment_files VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (f.version, f.segments, f.sha256, f.bytes))
            tx.run(f"UPDATE rounds SET status = '{CLOSED}', closed_at = ?, result_version = ? "
                   "WHERE round = ?", (now, v.version, round_index))
            if sample is not None:
                tx.run("INSERT INTO versions VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                status = tx.run("SELECT status FROM rounds WHERE round = ?",
                                (row.round,)).fetchone()
                if status is None or status[0] != OPEN:
                    raise RoundNotOpen(row.round)
                tx.run("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.round, row.client, row.sha256, row.bytes, row.num_samples,
                        row.mean_loss, ",".join(row.segments), row.received_at))
                _insert_event(tx, event)
        except self._integrity_errors:
            return False
        return True

    def add_downloads(self, totals: Sequence[DownloadTotal]) -> None:
        if not totals:
            return
        with self._tx() as tx:
            for t in totals:
                tx.run("INSERT INTO download_totals VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT "
                       "(round, client, version, segments) DO UPDATE SET requests = "
                       "download_totals.requests + excluded.requests, bytes = "
                       "download_totals.bytes + excluded.bytes",
                       (t.round, t.client, t.version, t.segments, t.requests, t.bytes))

    def bytes_out(self) -> dict[int, int]:
        return dict(self._all("SELECT round, CAST(SUM(bytes) AS BIGINT) FROM download_totals "
                              "GROUP BY round"))

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
        return self._one("SELECT 1 FROM versions WHERE version = ? UNION ALL SELECT 1 FROM "
                         "segment_files WHERE sha256 = ? UNION ALL SELECT 1 FROM uploads WHERE "
                         "sha256 = ? LIMIT 1", (sha256, sha256, sha256)) is not None


def _insert_round(tx: Tx, row: RoundRow, participants: Sequence[ParticipantRow]) -> None:
    tx.run("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           (row.round, row.status, row.base_version, row.opened_at, row.deadline,
            row.closing_at, row.close_reason, row.closed_at, row.result_version))
    for p in participants:
        _insert_participant(tx, p)


def _insert_participant(tx: Tx, p: ParticipantRow) -> None:
    tx.run("INSERT INTO participants VALUES (?, ?, ?, ?, ?, ?, ?)",
           (p.round, p.client, ",".join(p.download), ",".join(p.upload), p.seed,
            p.removed_at, p.removed_reason))


def _insert_event(tx: Tx, e: NewEvent) -> None:
    tx.run("INSERT INTO events (at, round, kind, message) VALUES (?, ?, ?, ?)",
           (e.at, e.round, e.kind, e.message))


def _participant(row: tuple) -> ParticipantRow:
    return ParticipantRow(row[0], row[1], _segs(row[2]), _segs(row[3]), row[4], row[5], row[6])


def _upload(row: tuple) -> UploadRow:
    return UploadRow(row[0], row[1], row[2], row[3], row[4], row[5], _segs(row[6]), row[7])
