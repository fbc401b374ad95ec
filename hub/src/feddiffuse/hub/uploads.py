"""Receiving an untrusted upload: one pass over the body, in constant memory.

The body is written to a temporary blob while it is hashed and checked: first the 8-byte
header length (against a limit), then the JSON header (names, dtypes, shapes and offsets via
`wire.check_layout`, and the delta's metadata), then the tensor bytes, whose float32 values are
checked to be finite slice by slice. In a compressed uplink codec (`codecs`) the header is
checked against that codec's layout, and the payload, a fraction of an fp32 one, is decoded
and checked whole once it has arrived (indices, int8 range, scales, values). Nothing is ever
unpickled, and an fp32 body is never held in memory. Reading stops at the first refusal: the
app answers, reading and dropping at most DRAIN_LIMIT more bytes first (so that the client
sees the answer, not a reset), then closes the connection.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError, safe_open

from feddiffuse.shared.codecs import (
    FP32,
    SEP,
    Codec,
    CodecError,
    check_payload_layout,
    decode_payload,
    parse_codec,
)
from feddiffuse.shared.errors import WireFormatError
from feddiffuse.shared.protocol import DELTA_METADATA_KEYS, ErrorCode
from feddiffuse.shared.wire import FORMAT_VERSION, PREFIX, check_layout, read_header

from .blobs import BlobStore, TempBlob
from .errors import HubError
from .layout import ModelLayout, canonical_segments
from .store.base import UploadRow

DRAIN_LIMIT = 1 << 20  # bytes read and dropped after a refusal before the connection is cut
_CHECK_SLICE = 1 << 20  # bytes of floats checked at once (bounds the temporary bool array)
_MAX_SAMPLES = 10**12
_LENGTH, _HEADER, _DATA = "length", "header", "data"


def invalid(message: str) -> HubError:
    return HubError(ErrorCode.INVALID_UPLOAD, message)


def _short(sha: str) -> str:
    return sha[:12] + "..."


def _whole_number(text: str) -> bool:
    """ASCII digits only ('５' and '٥' pass str.isdecimal and int(), but are no wire format),
    and few enough for int(), which refuses more than 4300 (no round or count needs 19)."""
    return text.isascii() and text.isdecimal() and len(text) <= 18


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object hook: safetensors forbids repeated keys (parsers disagree on which wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireFormatError("the header repeats a key")
    return out


@dataclass(frozen=True)
class UploadTicket:
    """What the hub expects of one upload, decided before the body is read."""

    round: int
    client: str
    preset: str
    base_version: str
    segments: tuple[str, ...]  # the segments this client was asked to report
    expected_shapes: dict[str, tuple[int, ...]] = field(repr=False)
    header_limit: int
    cap: int
    # Set when the client already uploaded for this round (or the round has closed since):
    # the body is then only compared with that upload, and `refusal` is the answer if differs.
    existing: UploadRow | None = None
    refusal: HubError | None = None
    codec: Codec = FP32  # the federation's uplink codec


@dataclass
class ReceivedUpload:
    sha256: str
    bytes: int
    num_samples: int
    mean_loss: float | None
    segments: tuple[str, ...]
    temp: TempBlob | None  # the synced temporary file (None when it matched `existing`)


class UploadReceiver:
    """Feed it the body's chunks as they arrive; `finish()` when the body has ended."""

    def __init__(self, ticket: UploadTicket, blobs: BlobStore, layout: ModelLayout,
                 declared_sha256: str | None = None) -> None:
        self.ticket = ticket
        self.layout = layout
        self.declared_sha256 = (declared_sha256 or "").strip().strip('"').lower() or None
        self.received = 0
        self.error: HubError | None = None
        self.stop_reading = False
        self._hash = hashlib.sha256()
        self._temp: TempBlob | None = None if ticket.existing else blobs.temp()
        self._phase = _LENGTH
        self._buf = bytearray()
        self._header_len = 0
        self._data_len = 0
        self._data_seen = 0
        self._tail = b""
        self._starts: list[int] = []
        self._names: list[str] = []
        self._num_samples = 0
        self._mean_loss: float | None = None
        self._trailing = False

    # -- intake -----------------------------------------------------------------------------

    def check_declared_length(self, content_length: int | None) -> None:
        if content_length is not None and content_length > self.ticket.cap:
            self.fail(self._too_large(content_length))

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.received += len(chunk)
        if self.error is not None:
            self.stop_reading = True
            return
        if self.received > self.ticket.cap:
            self.fail(self._too_large(None))
            return
        self._hash.update(chunk)
        if self._temp is not None:
            self._temp.write(chunk)
        if self.ticket.existing is None:
            try:
                self._parse(memoryview(chunk))
            except HubError as exc:
                self.fail(exc)

    def fail(self, error: HubError) -> None:
        if self.error is None:
            self.error = error
        self.discard()
        self.stop_reading = True

    def discard(self) -> None:
        if self._temp is not None:
            self._temp.discard()
            self._temp = None

    def finish(self) -> ReceivedUpload:
        """Check the body is complete, fsync it; raises the HubError that refuses it."""
        if self.error is None:
            try:
                return self._finish()
            except HubError as exc:
                self.fail(exc)
        self.discard()
        assert self.error is not None
        raise self.error

    def _finish(self) -> ReceivedUpload:
        t = self.ticket
        sha = self._hash.hexdigest()
        if self.declared_sha256 is not None and self.declared_sha256 != sha:
            raise invalid("the body's sha256 differs from the one its X-Content-SHA256 header "
                          "announced: it was damaged on the way; send it again")
        if t.existing is not None:
            if sha == t.existing.sha256:
                return ReceivedUpload(sha, t.existing.bytes, t.existing.num_samples,
                                      t.existing.mean_loss, t.existing.segments, None)
            assert t.refusal is not None
            raise t.refusal
        if self._trailing:
            raise invalid("the body continues past the end of its safetensors data")
        if self._phase != _DATA or self._data_seen != self._data_len:
            expected = (f"; the header announces {8 + self._header_len + self._data_len}"
                        if self._phase == _DATA else "")
            raise invalid(f"the body ended after {self.received} bytes, before the end of the "
                          f"safetensors file{expected}")
        assert self._temp is not None
        self._temp.sync()
        try:  # what aggregation will load it with must agree (its JSON parser is stricter)
            with safe_open(self._temp.path, framework="numpy"):
                pass
        except SafetensorError as exc:
            raise invalid(f"not a valid safetensors file: {exc}") from None
        if not t.codec.lossless:  # compressed: small enough to decode and check whole
            try:
                decode_payload(self._temp.path.read_bytes(), t.codec, t.expected_shapes)
            except WireFormatError as exc:
                raise invalid(f"the {t.codec.name} update is not valid: {exc}") from None
        temp, self._temp = self._temp, None
        return ReceivedUpload(sha, self.received, self._num_samples, self._mean_loss,
                              t.segments, temp)

    def _too_large(self, declared: int | None) -> HubError:
        size = f"{declared} bytes, " if declared is not None else ""
        return HubError(ErrorCode.TOO_LARGE,
                        f"the upload is {size}more than the {self.ticket.cap} bytes an update "
                        f"of {'+'.join(self.ticket.segments)} can take")

    # -- the file, piece by piece -------------------------------------------------------------

    def _parse(self, view: memoryview) -> None:
        while len(view):
            if self._phase == _LENGTH:
                take = 8 - len(self._buf)
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < 8:
                    return
                (self._header_len,) = struct.unpack("<Q", self._buf)
                if self._header_len > self.ticket.header_limit:
                    raise HubError(ErrorCode.TOO_LARGE,
                                   f"the safetensors header of {self._header_len} bytes exceeds "
                                   f"the {self.ticket.header_limit}-byte limit for this update")
                self._phase = _HEADER
            elif self._phase == _HEADER:
                take = 8 + self._header_len - len(self._buf)
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < 8 + self._header_len:
                    return
                self._check_header(bytes(self._buf))
                self._buf = bytearray()
                self._phase = _DATA
            else:
                self._check_data(view)
                return

    def _check_header(self, prefix: bytes) -> None:
        t = self.ticket
        try:
            header, _ = read_header(prefix)
            data_len = check_layout(header) if t.codec.lossless else 0
            json.loads(prefix[8:].decode("utf-8"), object_pairs_hook=_no_repeated_keys)
        except WireFormatError as exc:
            raise invalid(f"not a valid safetensors file: {exc}") from None
        except (RecursionError, ValueError):  # JSON nested too deep, a 4300+ digit number
            raise invalid("not a valid safetensors file: its header nests too deeply or holds "
                          "a number too long to read") from None
        metadata = header.get("__metadata__") or {}
        if not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise invalid("not a valid safetensors file: safetensors metadata must map strings "
                          "to strings")
        self._check_metadata(metadata)
        names = {n.split(SEP, 1)[0] for n in header if n != "__metadata__"}
        if names != set(t.expected_shapes):
            held = self.layout.segments_of_names(names)
            if held is not None:
                raise HubError(ErrorCode.WRONG_SEGMENTS,
                               f"the update holds {'+'.join(held) or 'nothing'}, but round "
                               f"{t.round} asks {t.client} for {'+'.join(t.segments)}")
        try:
            if t.codec.lossless:
                check_layout(header, t.expected_shapes)
            else:
                data_len = check_payload_layout(header, t.codec, t.expected_shapes)
        except WireFormatError as exc:
            raise invalid(f"the update does not fit {'+'.join(t.segments)}: {exc}") from None
        total = 8 + self._header_len + data_len
        if total > t.cap:
            raise self._too_large(total)
        self._data_len = data_len
        spans = sorted((info["data_offsets"][0], name) for name, info in header.items()
                       if name != "__metadata__")
        self._starts = [s for s, _ in spans]
        self._names = [n for _, n in spans]

    def _check_metadata(self, meta: dict[str, str]) -> None:
        t = self.ticket

        def get(key: str) -> str | None:
            return meta.get(PREFIX + key)

        missing = [k for k in DELTA_METADATA_KEYS if get(k) is None]
        if missing:
            raise invalid(f"the metadata lacks {', '.join(PREFIX + k for k in missing)}")
        if get("format_version") not in (None, FORMAT_VERSION):
            raise invalid(f"unknown format_version {get('format_version')!r}")
        if get("kind") != "delta":
            raise invalid(f"the file is a {get('kind')!r} file, not a delta")
        codec = get("codec")
        if codec != t.codec.name:
            try:
                parse_codec(codec or "")
            except CodecError:
                raise invalid(f"unknown codec {codec!r}; this federation's uplink codec is "
                              f"{t.codec.name}") from None
            raise invalid(f"the update is in codec {codec!r}, but this federation's uplink "
                          f"codec is {t.codec.name}")
        if get("preset") != t.preset:
            raise invalid(f"the delta is for preset {get('preset')!r}, the federation trains "
                          f"{t.preset!r}")
        round_text = get("round") or ""
        if not _whole_number(round_text) or int(round_text) != t.round:
            raise invalid(f"the delta says round {round_text!r} but was sent for round {t.round}")
        base = get("base_version") or ""
        if base != t.base_version:
            raise HubError(ErrorCode.STALE_BASE,
                           f"the delta is relative to global version {_short(base)}, but round "
                           f"{t.round} started from {_short(t.base_version)}; fetch the manifest")
        try:
            said = canonical_segments(s.strip() for s in (get("segments") or "").split(",")
                                      if s.strip())
        except ValueError as exc:
            raise invalid(f"the metadata names {exc}") from None
        if said != t.segments:
            raise HubError(ErrorCode.WRONG_SEGMENTS,
                           f"the update says it holds {'+'.join(said) or 'nothing'}, but round "
                           f"{t.round} asks {t.client} for {'+'.join(t.segments)}")
        samples = get("num_samples") or ""
        if not (_whole_number(samples) and 0 < int(samples) <= _MAX_SAMPLES):
            raise invalid(f"num_samples must be a positive whole number, not {samples!r}")
        self._num_samples = int(samples)
        loss = get("mean_loss")
        if loss is not None:
            try:
                value = float(loss)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise invalid(f"mean_loss must be a finite number, not {loss!r}")
            self._mean_loss = value

    def _check_data(self, view: memoryview) -> None:
        if self._data_seen + len(view) > self._data_len:
            # Refused at the end, so that the answer depends on the body's size (over the cap:
            # 413) and not on where the network happened to cut it into chunks.
            self._trailing = True
            view = view[:max(0, self._data_len - self._data_seen)]
        offset = self._data_seen  # data-section offset of view[0]
        self._data_seen += len(view)
        if not self.ticket.codec.lossless:  # not all floats: checked whole at the end
            return
        if self._tail:  # a float split across two chunks
            need = 4 - len(self._tail)
            piece = self._tail + bytes(view[:need])
            view = view[need:]
            if len(piece) < 4:
                self._tail = piece
                return
            self._check_floats(piece, offset - len(self._tail))
            offset += need
            self._tail = b""
        whole = len(view) - len(view) % 4
        for start in range(0, whole, _CHECK_SLICE):
            stop = min(start + _CHECK_SLICE, whole)
            self._check_floats(view[start:stop], offset + start)
        self._tail = bytes(view[whole:])

    def _check_floats(self, data: bytes | memoryview, offset: int) -> None:
        values = np.frombuffer(data, dtype="<f4")
        finite = np.isfinite(values)
        if not finite.all():
            at = offset + 4 * int(np.argmin(finite))
            name = self._names[bisect.bisect_right(self._starts, at) - 1]
            raise invalid(f"tensor {name!r} holds NaN or infinite values")
