"""What the hub does for a request, apart from moving rounds on: tokens, downloads and the
admission of uploads (checked before the body is read, re-checked when it is committed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.payloads import delta_metadata, segment_metadata, wire_subset
from feddiffuse.shared.protocol import ErrorCode, UploadReceipt

from .blobs import BlobStore, is_sha256
from .errors import HubError
from .layout import ModelLayout, canonical_segments
from .settings import FederationSettings
from .status import to_datetime
from .store import OPEN, HubStore
from .store.base import (
    DownloadTotal,
    NewEvent,
    RoundNotOpen,
    SegmentFileRow,
    TokenRevoked,
    UploadRow,
    VersionRow,
)
from .testhooks import crash_point, reach
from .tokens import (
    ADMIN,
    create_client_token,
    hash_token,
    new_token,
    revoke_client_token,
)
from .uploads import ReceivedUpload, UploadTicket
from .weights import (
    ALL_KEY,
    DENSE_KEY,
    delta_key,
    load_verified,
    single_threaded_torch,
    write_blob,
    write_encoded_blob,
)

log = logging.getLogger("feddiffuse.hub")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


@dataclass(frozen=True)
class ServedFile:
    blobs: BlobStore  # the file is its blob `sha256`
    size: int
    sha256: str
    version: str
    segments: str  # canonical key

    @property
    def etag(self) -> str:
        return f'"{self.version}:{self.segments}"'


class TokenService:
    def __init__(self, store: HubStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def create(self, name: str) -> str:
        return create_client_token(self.store, name, self.clock())

    def revoke(self, name: str) -> None:
        revoke_client_token(self.store, name, self.clock())

    def rotate_admin(self) -> str:
        """A new admin token (returned, to be shown once); the old one stops working."""
        token = new_token()
        now = self.clock()
        self.store.replace_token_hash(ADMIN, hash_token(token), now,
                                      NewEvent(now, None, "token", "admin token rotated"))
        return token

    def identify(self, token: str) -> Caller:
        row = self.store.token_by_hash(hash_token(token))
        if row is None:
            raise HubError(ErrorCode.UNAUTHORIZED, "the token is not known to this hub",
                           {"WWW-Authenticate": "Bearer"})
        if not row.active:
            raise HubError(ErrorCode.FORBIDDEN, f"the token of {row.name!r} has been revoked")
        return Caller(row.name, row.role)


class DownloadService:
    """Model files to serve, and the bytes actually sent, totalled in memory and written in
    batches (`flush`), never one synchronous row per request."""

    def __init__(self, store: HubStore, blobs: BlobStore, layout: ModelLayout,
                 settings: FederationSettings) -> None:
        self.store = store
        self.blobs = blobs
        self.layout = layout
        self.settings = settings
        self._build_lock = threading.Lock()
        self._pending: dict[tuple[int, str, str, str], list[int]] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def model_file(self, version: str, segments: str | None, base: str | None = None
                   ) -> ServedFile:
        if not is_sha256(version) or (row := self.store.version(version)) is None:
            raise HubError(ErrorCode.NOT_FOUND, f"there is no global version {version[:80]!r}")
        try:
            segs = canonical_segments(s.strip() for s in (segments or ALL_KEY).split(",")
                                      if s.strip())
        except ValueError as exc:
            raise HubError(ErrorCode.BAD_REQUEST,
                           f"{exc}; segments are {', '.join(SEGMENTS)}") from None
        key = ",".join(segs or SEGMENTS)
        if base is not None:
            return self._update_file(row, key, base)
        if key == ALL_KEY:
            dense = self.store.segment_file(version, DENSE_KEY)
            if dense is not None:  # the initial model, in the downlink codec's dense form
                return ServedFile(self.blobs, dense.bytes, dense.sha256, version, key)
            return ServedFile(self.blobs, row.bytes, version, version, key)
        seg_row = self.store.segment_file(version, key) or self.build_segment_file(row, key)
        return ServedFile(self.blobs, seg_row.bytes, seg_row.sha256,
                          version, key)

    def _update_file(self, row: VersionRow, key: str, base: str) -> ServedFile:
        """The update from `base` to `row`'s version for segments `key`, in the downlink
        codec (cut from the whole update on first use)."""
        whole = (self.store.segment_file(row.version, delta_key(ALL_KEY, base))
                 if is_sha256(base) else None)
        if whole is None:
            raise HubError(ErrorCode.NOT_FOUND, f"there is no update from {base[:80]!r} to "
                           f"{row.version[:12]}...; download the full model (no base)")
        full_key = delta_key(key, base)
        if key == ALL_KEY:
            part = whole
        else:
            with self._build_lock:
                part = self.store.segment_file(row.version, full_key) or self._cut_update(
                    row, key, base, whole)
        return ServedFile(self.blobs, part.bytes, part.sha256, row.version, full_key)

    def _cut_update(self, row: VersionRow, key: str, base: str, whole: SegmentFileRow
                    ) -> SegmentFileRow:
        wire = load_verified(self.blobs, whole.sha256)  # hash checked; safetensors
        names = self.layout.names_for(key.split(","))
        sha, size = write_encoded_blob(
            self.blobs, wire_subset(wire, names),
            delta_metadata(self.settings.preset, row.round, row.version, base, key),
            self.settings.links.downlink)
        part = SegmentFileRow(row.version, delta_key(key, base), sha, size)
        self.store.add_segment_file(part)
        return part

    def build_segment_file(self, row: VersionRow, key: str) -> SegmentFileRow:
        with self._build_lock:  # many clients ask at once: build once
            existing = self.store.segment_file(row.version, key)
            if existing is not None:
                return existing
            with single_threaded_torch():
                state = load_verified(self.blobs, row.version)
            names = self.layout.names_for(key.split(","))
            metadata = segment_metadata(self.settings.preset, row.round, row.version, key)
            sha, size = write_blob(self.blobs, {n: state[n] for n in names}, metadata)
            seg_row = SegmentFileRow(row.version, key, sha, size)
            self.store.add_segment_file(seg_row)
            return seg_row

    def accounting_round(self) -> int:
        """The round a download starting now is counted in."""
        fed = self.store.federation()
        # After the last round the final model's downloads belong to no round (its version
        # opens round R + 1, which never runs): the last round's bytes out stay what it served.
        return fed.current_round + 1 if fed.finished else fed.current_round

    def record(self, round_index: int, caller: Caller, served: ServedFile, sent: int) -> None:
        """Count `sent` bytes (what reached the connection, not what was asked for)."""
        key = (round_index, caller.name, served.version, served.segments)
        with self._pending_lock:
            total = self._pending.setdefault(key, [0, 0])
            total[0] += 1
            total[1] += sent

    def pending_bytes_out(self) -> dict[int, int]:
        out: dict[int, int] = {}
        with self._pending_lock:
            for (r, *_), (_, sent) in self._pending.items():
                out[r] = out.get(r, 0) + sent
        return out

    def flush(self) -> None:
        """Write the totals counted since the last flush, in one transaction."""
        with self._flush_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, {}
            totals = [DownloadTotal(*key, requests, sent)
                      for key, (requests, sent) in pending.items()]
            try:
                self.store.add_downloads(totals)
            except BaseException:
                with self._pending_lock:  # keep them for the next flush
                    for key, (requests, sent) in pending.items():
                        total = self._pending.setdefault(key, [0, 0])
                        total[0] += requests
                        total[1] += sent
                raise


class UploadSlots:
    """The uploads being received at once; one past `limit` is answered 503."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_progress = 0
        self._lock = threading.Lock()

    @contextmanager
    def taken(self) -> Iterator[None]:
        with self._lock:
            if self.in_progress >= self.limit:
                raise HubError(ErrorCode.UNAVAILABLE, f"the hub is receiving {self.limit} "
                               f"uploads already; send yours again in {self.retry_after_s} s",
                               {"Retry-After": str(self.retry_after_s)})
            self.in_progress += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_progress -= 1


class UploadService:
    """Whether an upload may be sent (before its body), and recording it (after)."""

    def __init__(self, store: HubStore, blobs: BlobStore, layout: ModelLayout,
                 settings: FederationSettings, clock: Clock, lock: threading.RLock) -> None:
        self.store = store
        self.blobs = blobs
        self.layout = layout
        self.settings = settings
        self.clock = clock
        self._lock = lock  # the hub's state lock: a round cannot close during a commit

    def prepare(self, client: str, round_index: int) -> UploadTicket:
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
                               f"the federation finished after {r} rounds")
            if round_index < r or row is not None:
                raise closed
            if round_index > r:
                raise HubError(ErrorCode.NOT_FOUND, f"round {round_index} has not opened; the "
                               f"current round is {r}")
            raise HubError(ErrorCode.NOT_PARTICIPANT, f"round {r} has not opened yet; wait for "
                           "your manifest to say it is open")
        plan = self.store.participant(round_index, client)
        if plan is None or (plan.removed and existing is None):
            raise HubError(ErrorCode.NOT_PARTICIPANT,
                           f"{client} is not a participant of round {r} (enrolled after it "
                           "opened); wait for the next round")
        if existing is not None:
            return self._compare_ticket(existing, HubError(
                ErrorCode.CONFLICT, f"{client} already uploaded a different update for round "
                f"{r}; an update cannot be replaced"))
        codec = self.settings.links.uplink
        return UploadTicket(round_index, client, self.settings.preset, row.base_version,
                            plan.upload, self.layout.shapes_for(plan.upload),
                            self.layout.header_limit(plan.upload, codec),
                            self.layout.upload_cap(plan.upload, codec), codec=codec)

    def _compare_ticket(self, existing: UploadRow, refusal: HubError) -> UploadTicket:
        cap = max(existing.bytes, self.layout.upload_cap(existing.segments,
                                                         self.settings.links.uplink))
        return UploadTicket(existing.round, existing.client, self.settings.preset, "",
                            existing.segments, {}, 0, cap, existing, refusal)

    def commit(self, ticket: UploadTicket, received: ReceivedUpload) -> UploadReceipt:
        """Store an upload that passed every check: blob first, then one transaction that
        also checks, once more, that the client's token is still active."""
        if ticket.existing is not None:
            return receipt(ticket.existing)
        reach("upload-commit")
        revoked = HubError(ErrorCode.FORBIDDEN, f"the token of {ticket.client!r} was revoked "
                           "before its upload was recorded; the upload is not counted")
        assert received.temp is not None
        # The blob goes in place before the lock (a rename and two fsyncs that a round's
        # close need not wait for); a refused upload's blob is removed again.
        self.blobs.commit(received.temp, received.sha256)
        recorded = False
        try:
            with self._lock:
                row = self.store.round(ticket.round)
                existing = self.store.upload(ticket.round, ticket.client)
                if existing is not None:  # a concurrent twin of this request got there first
                    if existing.sha256 == received.sha256:
                        return receipt(existing)
                    raise HubError(ErrorCode.CONFLICT, f"{ticket.client} already uploaded a "
                                   f"different update for round {ticket.round}")
                if row is None or row.status != OPEN:
                    raise HubError(ErrorCode.ROUND_CLOSED,
                                   f"round {ticket.round} closed while the upload arrived")
                token = self.store.token(ticket.client)
                if token is None or not token.active:
                    raise revoked
                crash_point("upload-commit")
                upload = UploadRow(ticket.round, ticket.client, received.sha256, received.bytes,
                                   received.num_samples, received.mean_loss, ticket.segments,
                                   self.clock())
                message = (f"round {ticket.round}: {ticket.client} reported "
                           f"{'+'.join(ticket.segments)} ({received.bytes / 1e6:.2f} MB, "
                           f"{received.num_samples} samples)")
                try:
                    recorded = self.store.add_upload(upload, NewEvent(
                        upload.received_at, ticket.round, "upload", message))
                except TokenRevoked:  # revoked by another process a moment ago
                    raise revoked from None
                except RoundNotOpen:  # closed by another replica a moment ago
                    raise HubError(ErrorCode.ROUND_CLOSED, f"round {ticket.round} closed while "
                                   "the upload arrived") from None
                if not recorded:
                    raise HubError(ErrorCode.CONFLICT, f"{ticket.client} already uploaded for "
                                   f"round {ticket.round}")
        finally:
            received.temp.discard()
            if not recorded:
                with self._lock:  # records are written under it
                    if not self.store.is_referenced(received.sha256):
                        self.blobs.remove(received.sha256)
        log.info(message)
        return receipt(upload)


def receipt(row: UploadRow) -> UploadReceipt:
    return UploadReceipt(round=row.round, client_id=row.client, sha256=row.sha256,
                         segments=list(row.segments), num_samples=row.num_samples,
                         bytes=row.bytes, received_at=to_datetime(row.received_at))
