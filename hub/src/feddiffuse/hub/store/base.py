"""What the hub keeps, behind one interface, so the store can be swapped (SQLite by default).

Every method is one atomic step: it either happens entirely or not at all. Operations that
must change several things together (publishing a global version and opening the next round,
recording an upload with its event) are single methods so that an implementation can make
them one transaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..settings import FederationSettings

OPEN = "open"  # collecting uploads
CLOSING = "closing"  # no more uploads; aggregation runs (or must be redone after a crash)
CLOSED = "closed"  # aggregated; its result is a published global version
ROUND_STATUSES = (OPEN, CLOSING, CLOSED)


@dataclass(frozen=True)
class FederationRow:
    settings: FederationSettings
    created_at: float
    current_round: int  # after the last round: the number of rounds
    current_version: str  # sha256 of the current global model's file
    finished_at: float | None
    sample_version: str | None = None  # the recipe's EMA model, once there is one

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass(frozen=True)
class TokenRow:
    name: str
    role: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class VersionRow:
    version: str  # sha256 of the full global file, which is blob `version`
    round: int  # the round this global model opens (rounds + 1 for the final model)
    bytes: int
    created_at: float


@dataclass(frozen=True)
class SegmentFileRow:
    version: str
    segments: str  # canonical, comma separated
    sha256: str
    bytes: int


@dataclass(frozen=True)
class RoundRow:
    round: int
    status: str
    base_version: str
    opened_at: float
    deadline: float | None
    closing_at: float | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    result_version: str | None = None


@dataclass(frozen=True)
class ParticipantRow:
    round: int
    client: str
    download: tuple[str, ...]
    upload: tuple[str, ...]
    seed: int
    removed_at: float | None = None  # taken out of the round (its token was revoked)
    removed_reason: str | None = None

    @property
    def removed(self) -> bool:
        return self.removed_at is not None


@dataclass(frozen=True)
class UploadRow:
    round: int
    client: str
    sha256: str
    bytes: int
    num_samples: int
    mean_loss: float | None
    segments: tuple[str, ...]
    received_at: float


@dataclass(frozen=True)
class DownloadTotal:
    """Bytes sent of one file to one client while `round` was current, over `requests`."""

    round: int
    client: str
    version: str
    segments: str
    requests: int
    bytes: int


class TokenRevoked(Exception):
    """An upload's token was revoked before the upload was recorded."""


class RoundNotOpen(Exception):
    """An upload's round stopped taking uploads (another replica closed it) before the upload
    was recorded."""


@dataclass(frozen=True)
class EventRow:
    id: int
    at: float
    round: int | None
    kind: str
    message: str


@dataclass(frozen=True)
class NewEvent:
    at: float
    round: int | None
    kind: str
    message: str


class HubStore(ABC):
    """The hub's durable state (the blobs live beside it, in a BlobStore)."""

    # -- the federation ---------------------------------------------------------------------

    @abstractmethod
    def create(self, settings: FederationSettings, initial: VersionRow, admin_token_hash: str,
               now: float) -> None:
        """Record a new federation, its initial global version and the admin token."""

    @abstractmethod
    def federation(self) -> FederationRow: ...

    # -- tokens -----------------------------------------------------------------------------

    @abstractmethod
    def add_token(self, name: str, role: str, token_hash: str, now: float) -> None:
        """Raises KeyError if the name is taken."""

    @abstractmethod
    def token_by_hash(self, token_hash: str) -> TokenRow | None: ...

    @abstractmethod
    def tokens(self) -> list[TokenRow]: ...

    @abstractmethod
    def revoke_token(self, name: str, now: float) -> bool:
        """False if there is no active token of that name."""

    @abstractmethod
    def token(self, name: str) -> TokenRow | None: ...

    @abstractmethod
    def replace_token_hash(self, name: str, token_hash: str, now: float, event: NewEvent
                           ) -> bool:
        """Give token `name` a new hash (the old token stops working); False if unknown."""

    @abstractmethod
    def enrolled_clients(self) -> list[str]:
        """Names of the client tokens not revoked, sorted."""

    # -- global versions and their segment files ---------------------------------------------

    @abstractmethod
    def version(self, version: str) -> VersionRow | None: ...

    @abstractmethod
    def segment_file(self, version: str, segments: str) -> SegmentFileRow | None: ...

    @abstractmethod
    def add_segment_file(self, row: SegmentFileRow) -> None: ...

    # -- rounds -----------------------------------------------------------------------------

    @abstractmethod
    def round(self, round_index: int) -> RoundRow | None: ...

    @abstractmethod
    def rounds(self) -> list[RoundRow]: ...

    @abstractmethod
    def open_round(self, row: RoundRow, participants: Sequence[ParticipantRow],
                   event: NewEvent) -> None:
        """Open the federation's current round (it must not exist yet)."""

    @abstractmethod
    def participants(self, round_index: int) -> list[ParticipantRow]:
        """The round's participants, removed ones included, sorted by client id."""

    @abstractmethod
    def remove_participants(self, round_index: int, clients: Sequence[str], reason: str,
                            now: float, event: NewEvent) -> list[str]:
        """Mark participants of an open round removed (those that have not reported and are
        not removed already); returns the ones marked."""

    @abstractmethod
    def restart_round(self, round_index: int, participants: Sequence[ParticipantRow],
                      deadline: float | None, event: NewEvent) -> None:
        """Give an open round new participants (none of them in it yet) and a new deadline."""

    @abstractmethod
    def participant(self, round_index: int, client: str) -> ParticipantRow | None: ...

    @abstractmethod
    def participated_before(self, client: str, round_index: int) -> bool:
        """Whether `client` was a participant of any round before `round_index`."""

    @abstractmethod
    def mark_closing(self, round_index: int, reason: str, now: float, event: NewEvent) -> bool:
        """open -> closing; False if the round was not open."""

    @abstractmethod
    def set_deadline(self, round_index: int, deadline: float, event: NewEvent) -> None: ...

    @abstractmethod
    def publish(self, round_index: int, new_version: VersionRow, now: float, finished: bool,
                next_round: tuple[RoundRow, Sequence[ParticipantRow]] | None,
                events: Sequence[NewEvent], sample: VersionRow | None = None,
                segment_files: Sequence[SegmentFileRow] = ()) -> None:
        """In one step: close the round with `new_version` as its result, make it the current
        global version, and either finish the federation, open the next round, or leave the
        next round pending (next_round None and not finished). `sample`, when given, becomes
        the model clients sample from (the recipe's EMA of the global model);
        `segment_files` (of the new version: the update a lossy downlink sends) are recorded
        with it, so that no manifest sees the version without them."""

    # -- uploads and downloads --------------------------------------------------------------

    @abstractmethod
    def upload(self, round_index: int, client: str) -> UploadRow | None: ...

    @abstractmethod
    def uploads(self, round_index: int) -> list[UploadRow]:
        """The round's accepted uploads, sorted by client id (the canonical order)."""

    @abstractmethod
    def add_upload(self, row: UploadRow, event: NewEvent) -> bool:
        """False (and nothing written) if the client already has an upload for the round.
        Raises TokenRevoked (nothing written) if the client's token is no longer active, and
        RoundNotOpen if the round is no longer open: the checks and the write are one step,
        so a revocation or a close (by any process) lands before or after, never between."""

    @abstractmethod
    def add_downloads(self, totals: Sequence[DownloadTotal]) -> None:
        """Add to the running totals, in one step (the hub batches its downloads)."""

    @abstractmethod
    def bytes_out(self) -> dict[int, int]:
        """round -> bytes served while it was the current round."""

    # -- events and housekeeping ------------------------------------------------------------

    @abstractmethod
    def add_event(self, event: NewEvent) -> None: ...

    @abstractmethod
    def events(self, limit: int = 100) -> list[EventRow]:
        """The most recent events, oldest first."""

    @abstractmethod
    def referenced_blobs(self) -> set[str]:
        """Every blob name a record refers to."""

    @abstractmethod
    def is_referenced(self, sha256: str) -> bool:
        """Whether a record refers to blob `sha256`."""

    @abstractmethod
    def close(self) -> None: ...
