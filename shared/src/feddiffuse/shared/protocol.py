"""The hub <-> client protocol: URL paths, pydantic wire models, error codes.

Both the hub (FastAPI) and the edge client (httpx) import these, so the two sides cannot drift.
Weights travel as safetensors bodies (see `wire`), never inside JSON.

Endpoints (all under API_PREFIX = "/api/v1"; a client sends `Authorization: Bearer <token>`):

    GET  /federation                      -> FederationInfo
    GET  /manifest                        -> Manifest for the caller and the current round
    GET  /models/{version}?segments=a,b   -> safetensors of those segments of that global
                                             version (ETag = "<version>:<segments>", Range ok);
                                             with &base=<older version>, the update from it
                                             in the downlink codec (Manifest.delta_base)
    PUT  /rounds/{round}/update           -> UploadReceipt; body: a delta safetensors file
    GET  /admin/status                    -> HubStatus            (admin token)
    POST /admin/rounds/current/close      -> HubStatus            (admin token)
    POST /admin/rounds/current/extend     -> HubStatus; body ExtendRequest (admin token)
    GET  /health                          -> {"status": "ok", "protocol": 1} (no token; probes)

Errors are `ErrorBody` JSON with a machine-readable `code` (ErrorCode) and a `message`; the
HTTP status of each code is `ERROR_STATUS`. Model downloads carry `CONTENT_SHA256_HEADER` (the
sha256 of the whole file, also on a 206), and an upload may send it so the hub can check the
bytes it received. Segments in URLs and ETags are comma separated, in the order encoder,
bottleneck, decoder; without `segments` the whole model is served, whose sha256 is `version`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from .privacy.settings import PrivacyReport

API_PREFIX = "/api/v1"
PROTOCOL_VERSION = 1
SAFETENSORS_MEDIA_TYPE = "application/octet-stream"
CONTENT_SHA256_HEADER = "X-Content-SHA256"  # hex sha256 of a whole weights file

# Metadata keys (without the "feddiffuse." prefix the wire module adds) of an uploaded delta.
DELTA_METADATA_KEYS = ("kind", "preset", "round", "base_version", "num_samples", "segments",
                       "codec")
OPTIONAL_DELTA_METADATA_KEYS = ("mean_loss",)  # the client's mean training loss this round


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"  # missing or unknown token
    FORBIDDEN = "forbidden"  # revoked token, or a client token on an admin endpoint
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the path exists, not with this HTTP method
    REQUEST_TIMEOUT = "request_timeout"  # the request's headers or body stopped arriving
    ROUND_CLOSED = "round_closed"  # the upload is for a round that is no longer open
    NOT_PARTICIPANT = "not_participant"  # the caller is not part of this round
    WRONG_SEGMENTS = "wrong_segments"  # the upload holds other segments than assigned
    CONFLICT = "conflict"  # a different upload for the same client and round exists
    STALE_BASE = "stale_base"  # the delta is relative to another global version
    INVALID_UPLOAD = "invalid_upload"  # not a valid safetensors delta (names, shapes, NaN...)
    TOO_LARGE = "too_large"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    FEDERATION_FINISHED = "federation_finished"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"  # busy (too many uploads at once): retry after Retry-After


# The HTTP status the hub answers with for each error code.
ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.ROUND_CLOSED: 409,
    ErrorCode.NOT_PARTICIPANT: 409,
    ErrorCode.WRONG_SEGMENTS: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.STALE_BASE: 409,
    ErrorCode.INVALID_UPLOAD: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RANGE_NOT_SATISFIABLE: 416,
    ErrorCode.FEDERATION_FINISHED: 409,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(_Model):
    code: ErrorCode
    message: str


class TrainingSettings(_Model):
    """How a client trains this round: the hub's recipe (feddiffuse.shared.recipes) and the
    round's seed. Fields left out read as the paper's recipe (an older hub sent only the
    first four)."""

    local_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    loss: str = "huber"
    seed: int = 0  # the client's training seed for this round
    recipe: str = "paper"  # the recipe's name
    optimizer: str = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: str = "constant"
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    loss_weighting: str = "none"
    bf16: bool = False
    channels_last: bool = True
    ema_decay: float | None = Field(default=None, ge=0, lt=1)
    server_lr: float = Field(default=1.0, gt=0)
    keep_optimizer: bool = False


class RoundPhase(StrEnum):
    OPEN = "open"  # the caller should train and upload
    REPORTED = "reported"  # the caller already uploaded; wait for the next round
    WAITING = "waiting"  # the caller is not part of the current round; wait for the next
    FINISHED = "finished"  # the federation is over; the final model can be downloaded


class Manifest(_Model):
    protocol: int = PROTOCOL_VERSION
    federation: str
    client_id: str
    phase: RoundPhase
    round: int  # the current round (after the last round: the number of rounds)
    rounds: int
    method: str
    preset: str
    global_version: str  # sha256 hex of the global model's full safetensors file
    download_segments: list[str]
    upload_segments: list[str]
    training: TrainingSettings
    deadline: datetime | None = None
    retry_after_s: float | None = None  # for WAITING / REPORTED: when to ask again
    # The model to sample from: the recipe's EMA of the global model (a full model file, like
    # global_version); None: sample the global model itself.
    sample_version: str | None = None
    # The federation's codecs (feddiffuse.shared.codecs): the upload must be in uplink_codec.
    uplink_codec: str = "fp32"
    downlink_codec: str = "fp32"
    # With a lossy downlink: the version the hub sends global_version's update from
    # (GET /models/{global_version}?base=...); a client holding it applies the update, any
    # other downloads the full model.
    delta_base: str | None = None
    # Differential privacy (feddiffuse.shared.privacy): what to clip (and, local DP, noise)
    # before encoding, and the epsilon spent so far; None: the federation is not private.
    privacy: PrivacyReport | None = None


class FederationInfo(_Model):
    protocol: int = PROTOCOL_VERSION
    name: str
    preset: str
    method: str
    rounds: int
    local_epochs: int
    min_clients: int
    round_timeout_s: float | None
    current_round: int
    finished: bool
    parameters: dict[str, int]  # segment -> parameter count, plus "total"
    recipe: str = "paper"  # the training recipe's name (the manifest carries all of it)
    sample_version: str | None = None  # the model to sample from (the recipe's EMA), if any
    uplink_codec: str = "fp32"
    downlink_codec: str = "fp32"
    privacy: PrivacyReport | None = None  # DP settings and epsilon spent; None: not private


class UploadReceipt(_Model):
    round: int
    client_id: str
    sha256: str
    segments: list[str]
    num_samples: int
    bytes: int
    received_at: datetime


class RoundSummary(_Model):
    round: int
    participants: list[str]
    reported: list[str]
    missing: list[str]
    bytes_in: int
    bytes_out: int
    mean_loss: float | None
    opened_at: datetime
    closed_at: datetime | None = None
    global_version: str  # the version the round started from


class HubStatus(_Model):
    federation: FederationInfo
    current: RoundSummary | None
    deadline: datetime | None
    waiting_for_quorum: bool
    history: list[RoundSummary]
    note: str | None = None  # one human sentence on what the hub is doing or waiting for


class ExtendRequest(_Model):
    seconds: float = Field(gt=0, le=7 * 24 * 3600)
