"""The hub's core: rounds driven around the store, with no HTTP in sight.

One `Hub` object per hub directory. The web app and the CLI call it; it owns the round
lifecycle:

    pending --(enough clients enrolled)--> open --(all reported, or deadline with quorum,
    or admin close)--> closing --(aggregate, publish)--> closed, and the next round opens

Aggregation replays the round's stored uploads into a fresh `RoundState` of the shared core
(`replay.py`). A round left `closing` by a crash is simply replayed again when the hub starts,
which gives the same bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from feddiffuse.shared.methods import plan_round
from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import (
    ErrorCode,
    FederationInfo,
    HubStatus,
    Manifest,
    UploadReceipt,
)

from . import status as status_view
from .blobs import BlobStore, is_sha256
from .errors import HubError
from .layout import ModelLayout, canonical_segments
from .paths import HubPaths, ServeLock
from .replay import replay_round
from .settings import training_seed
from .store import CLOSING, OPEN, HubStore, open_store
from .store.base import (
    FederationRow,
    NewEvent,
    ParticipantRow,
    RoundRow,
    SegmentFileRow,
    UploadRow,
    VersionRow,
)
from .testhooks import crash_point
from .tokens import ADMIN, create_client_token, hash_token, revoke_client_token
from .uploads import ReceivedUpload, UploadTicket
from .weights import (
    ALL_KEY,
    global_metadata,
    header_prefix,
    load_verified,
    single_threaded_torch,
    write_blob,
)

log = logging.getLogger("feddiffuse.hub")

Clock = Callable[[], float]
AGGREGATION_RETRY_S = 30.0  # after a failed aggregation (e.g. a full disk), wait this long


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


@dataclass(frozen=True)
class ServedFile:
    path: Path
    size: int
    sha256: str
    version: str
    segments: str  # canonical key

    @property
    def etag(self) -> str:
        return f'"{self.version}:{self.segments}"'


class Hub:
    """A hub directory, opened. With `serving`, it also drives the rounds (one process only)."""

    def __init__(self, paths: HubPaths, store: HubStore, *, clock: Clock = time.time,
                 serve_lock: ServeLock | None = None) -> None:
        self.paths = paths
        self.store = store
        self.blobs = BlobStore(paths.blobs)
        self.clock = clock
        self._serve_lock = serve_lock
        fed = store.federation()
        self.settings = fed.settings
        self.layout = ModelLayout.from_file_prefix(header_prefix(self.blobs, fed.current_version))
        self._lock = threading.RLock()  # state changes: open, commit upload, close, publish
        self._aggregating = threading.Lock()
        self._build_lock = threading.Lock()
        self._retry_at = 0.0
        self.aggregation_error: str | None = None
        self._noted: set[tuple[str, int]] = set()
        self._closed = False
        # Long-polling manifests: `generation` grows whenever a round opens or the federation
        # moves on; listeners (one per waiting request) are called from the thread that did it.
        self.generation = 0
        self._listeners: set[Callable[[], None]] = set()
        self._listeners_lock = threading.Lock()

    @property
    def serving(self) -> bool:
        return self._serve_lock is not None and not self._closed

    @classmethod
    def open(cls, root: str | Path, *, serve: bool = False, clock: Clock = time.time) -> Hub:
        """Open a hub directory. With `serve`: take the serve lock, clean up after a crash
        (temporary files, unrecorded blobs), redo a cut-off aggregation, open a due round."""
        paths = HubPaths(Path(root)).require_hub()
        lock = ServeLock(paths) if serve else None
        try:
            hub = cls(paths, open_store(paths.db), clock=clock, serve_lock=lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if serve:
            hub.recover()
        return hub

    def close(self) -> None:
        # Same order as an aggregation takes them (it publishes under _lock): no deadlock.
        with self._aggregating, self._lock:
            self._closed = True
            self.store.close()
            if self._serve_lock is not None:
                self._serve_lock.release()
                self._serve_lock = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        temps = self.blobs.remove_temporaries()
        orphans = self.blobs.collect_garbage(self.store.referenced_blobs())
        if temps or orphans:
            log.info("start: removed %d temporary file(s) and %d unrecorded blob(s) left by an "
                     "earlier stop", temps, orphans)
        self.tick()

    # -- tokens -----------------------------------------------------------------------------

    def create_token(self, name: str) -> str:
        return create_client_token(self.store, name, self.clock())

    def revoke_token(self, name: str) -> None:
        revoke_client_token(self.store, name, self.clock())

    def identify(self, token: str) -> Caller:
        row = self.store.token_by_hash(hash_token(token))
        if row is None:
            raise HubError(ErrorCode.UNAUTHORIZED, "the token is not known to this hub",
                           {"WWW-Authenticate": "Bearer"})
        if not row.active:
            raise HubError(ErrorCode.FORBIDDEN, f"the token of {row.name!r} has been revoked")
        return Caller(row.name, row.role)

    # -- what clients read ------------------------------------------------------------------

    def federation_info(self) -> FederationInfo:
        return status_view.federation_info(self.store.federation(), self.layout)

    def manifest(self, client: str) -> Manifest:
        return status_view.manifest(self.store, client, self.clock())

    def add_listener(self, wake: Callable[[], None]) -> None:
        with self._listeners_lock:
            self._listeners.add(wake)

    def remove_listener(self, wake: Callable[[], None]) -> None:
        with self._listeners_lock:
            self._listeners.discard(wake)

    def _moved_on(self) -> None:
        """A round opened, or one was published: wake every long-polling manifest request."""
        with self._listeners_lock:
            self.generation += 1
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def status(self) -> HubStatus:
        return status_view.hub_status(self, self.clock())

    # -- downloads --------------------------------------------------------------------------

    def model_file(self, version: str, segments: str | None) -> ServedFile:
        if not is_sha256(version) or (row := self.store.version(version)) is None:
            raise HubError(ErrorCode.NOT_FOUND, f"there is no global version {version[:80]!r}")
        try:
            segs = canonical_segments(s.strip() for s in (segments or ALL_KEY).split(",")
                                      if s.strip())
        except ValueError as exc:
            raise HubError(ErrorCode.BAD_REQUEST,
                           f"{exc}; segments are {', '.join(SEGMENTS)}") from None
        key = ",".join(segs or SEGMENTS)
        if key == ALL_KEY:
            return ServedFile(self.blobs.path(version), row.bytes, version, version, key)
        seg_row = self.store.segment_file(version, key) or self._build_segment_file(row, key)
        return ServedFile(self.blobs.path(seg_row.sha256), seg_row.bytes, seg_row.sha256,
                          version, key)

    def _build_segment_file(self, row: VersionRow, key: str) -> SegmentFileRow:
        with self._build_lock:  # many clients ask at once: build once
            existing = self.store.segment_file(row.version, key)
            if existing is not None:
                return existing
            with single_threaded_torch():
                state = load_verified(self.blobs, row.version)
            names = self.layout.names_for(key.split(","))
            metadata = {"kind": "global", "preset": self.settings.preset, "round": row.round,
                        "version": row.version, "segments": key}
            sha, size = write_blob(self.blobs, {n: state[n] for n in names}, metadata)
            seg_row = SegmentFileRow(row.version, key, sha, size)
            self.store.add_segment_file(seg_row)
            return seg_row

    def record_download(self, caller: Caller, served: ServedFile, nbytes: int) -> None:
        fed = self.store.federation()
        # After the last round the final model's downloads belong to no round (its version
        # opens round R + 1, which never runs): the last round's bytes out stay what it served.
        round_index = fed.current_round + 1 if fed.finished else fed.current_round
        self.store.add_download(round_index, caller.name, served.version, served.segments,
                                nbytes, self.clock())

    # -- uploads ----------------------------------------------------------------------------

    def prepare_upload(self, client: str, round_index: int) -> UploadTicket:
        """Decide, before reading a body, what an upload to `round_index` must be."""
        fed = self.store.federation()
        r = fed.current_round
        existing = self.store.upload(round_index, client)
        row = self.store.round(round_index)
        closed = HubError(ErrorCode.ROUND_CLOSED,
                          f"round {round_index} is closed; fetch the manifest for the next one")
        if fed.finished or round_index != r or row is None or row.status != OPEN:
            if existing is not None:  # a retry of an upload that made it: compare, answer same
                return self._compare_ticket(existing, closed)
            if fed.finished:
                raise HubError(ErrorCode.FEDERATION_FINISHED,
                               f"the federation finished after {self.settings.rounds} rounds")
            if round_index < r or row is not None:
                raise closed
            if round_index > r:
                raise HubError(ErrorCode.NOT_FOUND, f"round {round_index} has not opened; the "
                               f"current round is {r}")
            raise HubError(ErrorCode.NOT_PARTICIPANT, f"round {r} has not opened yet; wait for "
                           "your manifest to say it is open")
        plan = self.store.participant(round_index, client)
        if plan is None:
            raise HubError(ErrorCode.NOT_PARTICIPANT,
                           f"{client} is not a participant of round {r} (enrolled after it "
                           "opened); wait for the next round")
        if existing is not None:
            return self._compare_ticket(existing, HubError(
                ErrorCode.CONFLICT, f"{client} already uploaded a different update for round "
                f"{r}; an update cannot be replaced"))
        return UploadTicket(round_index, client, self.settings.preset, row.base_version,
                            plan.upload, self.layout.shapes_for(plan.upload),
                            self.layout.header_limit(plan.upload),
                            self.layout.upload_cap(plan.upload))

    def _compare_ticket(self, existing: UploadRow, refusal: HubError) -> UploadTicket:
        cap = max(existing.bytes, self.layout.upload_cap(existing.segments))
        return UploadTicket(existing.round, existing.client, self.settings.preset, "",
                            existing.segments, {}, 0, cap, existing, refusal)

    def commit_upload(self, ticket: UploadTicket, received: ReceivedUpload) -> UploadReceipt:
        """Store an upload that passed every check: blob first, then one transaction."""
        if ticket.existing is not None:
            return self._receipt(ticket.existing)
        try:
            with self._lock:
                row = self.store.round(ticket.round)
                existing = self.store.upload(ticket.round, ticket.client)
                if existing is not None:  # a concurrent twin of this request got there first
                    if existing.sha256 == received.sha256:
                        return self._receipt(existing)
                    raise HubError(ErrorCode.CONFLICT, f"{ticket.client} already uploaded a "
                                   f"different update for round {ticket.round}")
                if row is None or row.status != OPEN:
                    raise HubError(ErrorCode.ROUND_CLOSED,
                                   f"round {ticket.round} closed while the upload arrived")
                assert received.temp is not None
                self.blobs.commit(received.temp, received.sha256)
                crash_point("upload-commit")
                upload = UploadRow(ticket.round, ticket.client, received.sha256, received.bytes,
                                   received.num_samples, received.mean_loss, ticket.segments,
                                   self.clock())
                message = (f"round {ticket.round}: {ticket.client} reported "
                           f"{'+'.join(ticket.segments)} ({received.bytes / 1e6:.2f} MB, "
                           f"{received.num_samples} samples)")
                self.store.add_upload(upload, NewEvent(upload.received_at, ticket.round,
                                                       "upload", message))
        finally:
            if received.temp is not None:
                received.temp.discard()
        log.info(message)
        return self._receipt(upload)

    @staticmethod
    def _receipt(row: UploadRow) -> UploadReceipt:
        return UploadReceipt(round=row.round, client_id=row.client, sha256=row.sha256,
                             segments=list(row.segments), num_samples=row.num_samples,
                             bytes=row.bytes, received_at=status_view.to_datetime(row.received_at))

    # -- the round lifecycle ----------------------------------------------------------------

    def tick(self) -> None:
        """Move the rounds on if due: open a pending round, close one, redo an aggregation.

        Called at start, by the app's background task every second and after each request.
        """
        if self.advance():
            self._aggregate(self.store.federation().current_round)

    def advance(self) -> bool:
        """The quick part of `tick` (open or mark closing; called before each request).
        Returns whether the current round is closing and awaits its aggregation."""
        with self._lock:
            if not self.serving:
                return False
            fed = self.store.federation()
            if fed.finished:
                return False
            row = self.store.round(fed.current_round)
            if row is None:
                self._open_round(fed)
                return False
            if row.status == OPEN:
                reason = self._close_reason(row)
                if reason is None:
                    return False
                self._mark_closing(row, reason)
            return True

    def close_round_now(self) -> HubStatus:
        """The admin closes the current round: it aggregates whatever has been reported."""
        with self._lock:
            fed = self._unfinished()
            row = self._current_row(fed)
            if row.status == OPEN:
                if not self.store.uploads(row.round):
                    raise HubError(ErrorCode.CONFLICT,
                                   f"nobody has reported in round {row.round} yet, so there is "
                                   "nothing to aggregate; extend the round instead")
                self._mark_closing(row, "closed by the admin")
            self._retry_at = 0.0
        self._aggregate(row.round)
        return self.status()

    def extend_round(self, seconds: float) -> HubStatus:
        """Push the current round's deadline back (from now if it has passed or is unset)."""
        with self._lock:
            fed = self._unfinished()
            row = self._current_row(fed)
            if row.status != OPEN:
                raise HubError(ErrorCode.ROUND_CLOSED, f"round {row.round} is already closing")
            now = self.clock()
            deadline = max(row.deadline or now, now) + seconds
            message = (f"round {row.round}: deadline extended by {seconds:g} s to "
                       f"{status_view.to_datetime(deadline).isoformat(timespec='seconds')}")
            self.store.set_deadline(row.round, deadline,
                                    NewEvent(now, row.round, "extended", message))
            self._noted.discard(("quorum", row.round))
        log.info(message)
        return self.status()

    def _unfinished(self) -> FederationRow:
        fed = self.store.federation()
        if fed.finished:
            raise HubError(ErrorCode.FEDERATION_FINISHED,
                           f"the federation finished after {self.settings.rounds} rounds")
        return fed

    def _current_row(self, fed: FederationRow) -> RoundRow:
        row = self.store.round(fed.current_round)
        if row is None:
            raise HubError(ErrorCode.CONFLICT, f"round {fed.current_round} has not opened yet: "
                           f"it waits for {self.settings.min_clients} enrolled client(s)")
        return row

    def _close_reason(self, row: RoundRow) -> str | None:
        reported = {u.client for u in self.store.uploads(row.round)}
        if not reported:
            return None
        active = set(self.store.enrolled_clients())  # a revoked participant is not awaited
        awaited = {p.client for p in self.store.participants(row.round) if p.client in active}
        if awaited <= reported:
            return "every participant reported"
        if row.deadline is not None and self.clock() >= row.deadline:
            if len(reported) >= self.settings.min_clients:
                return f"deadline passed with {len(reported)} report(s)"
            if ("quorum", row.round) not in self._noted:
                self._noted.add(("quorum", row.round))
                self._event(row.round, "quorum", f"round {row.round}: deadline passed with "
                            f"{len(reported)} of the {self.settings.min_clients} reports the "
                            "quorum needs; waiting")
        return None

    def _mark_closing(self, row: RoundRow, reason: str) -> None:
        message = f"round {row.round} closing: {reason}"
        if self.store.mark_closing(row.round, reason, self.clock(),
                                   NewEvent(self.clock(), row.round, "closing", message)):
            log.info(message)

    def _plan(self, round_index: int, base_version: str,
              now: float) -> tuple[RoundRow, list[ParticipantRow]] | None:
        """Round `round_index` with the clients enrolled now, or None below the quorum."""
        s = self.settings
        clients = self.store.enrolled_clients()
        if len(clients) < s.min_clients or not clients:
            return None
        plans = plan_round(s.method, clients, round_index, s.seed)
        participants = [
            ParticipantRow(round_index, c, plan.download
                           if self.store.participated_before(c, round_index) else SEGMENTS,
                           plan.upload, training_seed(s.seed, round_index, c))
            for c, plan in plans.items()
        ]
        deadline = now + s.round_timeout_s if s.round_timeout_s else None
        return RoundRow(round_index, OPEN, base_version, now, deadline), participants

    def _opened_message(self, row: RoundRow, participants: list[ParticipantRow]) -> str:
        deadline = (f", deadline {status_view.to_datetime(row.deadline).isoformat('T', 'seconds')}"
                    if row.deadline is not None else "")
        return (f"round {row.round}/{self.settings.rounds} opened with {len(participants)} "
                f"participant(s): {', '.join(p.client for p in participants)}{deadline}")

    def _open_round(self, fed: FederationRow) -> None:
        now = self.clock()
        planned = self._plan(fed.current_round, fed.current_version, now)
        if planned is None:
            if ("pending", fed.current_round) not in self._noted:
                self._noted.add(("pending", fed.current_round))
                self._event(fed.current_round, "pending", f"round {fed.current_round} waits for "
                            f"{self.settings.min_clients} enrolled client(s) to open")
            return
        row, participants = planned
        message = self._opened_message(row, participants)
        self.store.open_round(row, participants, NewEvent(now, row.round, "opened", message))
        log.info(message)
        self._prebuild(row, participants)
        self._moved_on()

    def _prebuild(self, row: RoundRow, participants: list[ParticipantRow]) -> None:
        vrow = self.store.version(row.base_version)
        for key in sorted({",".join(p.download) for p in participants} - {ALL_KEY}):
            if vrow is not None and self.store.segment_file(vrow.version, key) is None:
                self._build_segment_file(vrow, key)

    def _aggregate(self, round_index: int) -> None:
        if not self._aggregating.acquire(blocking=False):
            return  # another thread is at it
        try:
            if not self.serving:
                return
            row = self.store.round(round_index)
            if row is None or row.status != CLOSING or time.monotonic() < self._retry_at:
                return
            try:
                self._aggregate_and_publish(row)
                self.aggregation_error = None
            except Exception as exc:  # keep serving; the round stays closing and is retried
                self.aggregation_error = f"{type(exc).__name__}: {exc}"
                self._retry_at = time.monotonic() + AGGREGATION_RETRY_S
                log.exception("round %d: aggregation failed; retrying in %.0f s", round_index,
                              AGGREGATION_RETRY_S)
        finally:
            self._aggregating.release()

    def _aggregate_and_publish(self, row: RoundRow) -> None:
        s = self.settings
        started = time.perf_counter()
        r = row.round
        version, size, count = replay_round(self.store, self.blobs, self.layout, s, row)
        sample = self._update_sample_model(version, r + 1)
        crash_point("publish")
        now = self.clock()
        finished = r >= s.rounds
        seconds = time.perf_counter() - started
        with self._lock:
            planned = None if finished else self._plan(r + 1, version, now)
            events = [NewEvent(now, r, "closed", f"round {r} closed: aggregated {count} "
                               f"update(s) in {seconds:.2f} s; global version "
                               f"{version[:12]}...")]
            if finished:
                events.append(NewEvent(now, r, "finished", f"federation finished after {r} "
                                       f"rounds; final global version {version[:12]}..."))
            elif planned is not None:
                events.append(NewEvent(now, r + 1, "opened",
                                       self._opened_message(*planned)))
            self.store.publish(r, VersionRow(version, r + 1, size, now), now, finished,
                               planned, events,
                               None if sample is None
                               else VersionRow(sample[0], r + 1, sample[1], now))
        for e in events:
            log.info(e.message)
        if planned is not None:
            self._prebuild(*planned)
        self._moved_on()
        if planned is None and not finished:
            self.tick()  # logs that the next round waits for clients

    def _update_sample_model(self, version: str, round_index: int) -> tuple[str, int] | None:
        """The recipe's EMA of the global model, advanced by the new global `version`, as a
        blob (not yet published); None when the recipe keeps no EMA. Computed from the stored
        EMA and the new global alone, so an aggregation redone after a crash gives the same
        bytes."""
        decay = self.settings.training_recipe.ema_decay
        if decay is None:
            return None
        from feddiffuse.shared.recipes import update_ema

        previous = self.store.federation().sample_version
        with single_threaded_torch():
            ema = None if previous is None else load_verified(self.blobs, previous)
            ema = update_ema(ema, load_verified(self.blobs, version), decay)
            return write_blob(self.blobs, ema, {**global_metadata(self.settings.preset,
                                                                  round_index),
                                                "kind": "global-ema", "ema_decay": decay})

    def export(self, out: str | Path, which: str = "sample") -> tuple[str, int]:
        """Copy a model to `out` (atomically); returns (version, bytes). `which` is "sample"
        (the model clients sample from: the recipe's EMA when it keeps one) or "global" (the
        last aggregate, the one training continues from)."""
        from feddiffuse.shared.wire import atomic_write_bytes

        fed = self.store.federation()
        version = fed.current_version
        if which == "sample" and fed.sample_version is not None:
            version = fed.sample_version
        data = self.blobs.read_bytes(version)
        atomic_write_bytes(out, data)
        return version, len(data)

    def _event(self, round_index: int | None, kind: str, message: str) -> None:
        self.store.add_event(NewEvent(self.clock(), round_index, kind, message))
        log.info(message)
