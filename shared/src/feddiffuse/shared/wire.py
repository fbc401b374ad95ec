"""How weights and deltas travel and rest: safetensors only, never pickle.

A FedDiffuse weights file is a safetensors file whose metadata (string -> string) says what it
is. Keys (all prefixed ``feddiffuse.``):

- ``kind``: ``global`` (a global model or segments of it), ``delta`` (a client's update),
  ``personal`` (a client's own model), ``checkpoint``.
- ``preset``: the UNet preset, so any command can rebuild the network without being told.
- ``round``, ``base_version`` (sha256 of the global file the delta is relative to),
  ``num_samples``, ``segments`` (comma separated), ``codec``, ``format_version``.

This module writes and reads fp32 files; the other codecs (bf16, int8, top-k) are in `codecs`,
whose fp32 payloads are exactly these files.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from .errors import UserError, WireFormatError

FORMAT_VERSION = "1"
PREFIX = "feddiffuse."
CODECS = ("fp32",)
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: a paper-celeba header is ~40 KiB


def _meta(metadata: Mapping[str, object]) -> dict[str, str]:
    out = {f"{PREFIX}format_version": FORMAT_VERSION}
    for k, v in metadata.items():
        out[k if k.startswith(PREFIX) else PREFIX + k] = str(v)
    return out


def read_metadata_value(metadata: Mapping[str, str], key: str) -> str | None:
    return metadata.get(PREFIX + key)


class ByteSink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def _header_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object],
                  codec: str) -> bytes:
    header: dict[str, object] = {"__metadata__": _meta({**metadata, "codec": codec})}
    offset = 0
    for name in sorted(tensors):
        size = 4 * tensors[name].numel()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes


def write_tensors(sink: ByteSink, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, object], codec: str = "fp32") -> tuple[str, int]:
    """Stream fp32 `tensors` as a safetensors file into `sink`; returns (sha256, size).

    Written by hand rather than with safetensors' writer (whose metadata order follows a hash
    map and changes between processes) so that the same tensors and metadata give the same
    bytes, and hence the same sha256 version, everywhere. Streams tensor by tensor.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")

    def blocks() -> Iterator[memoryview]:
        for name in sorted(tensors):
            array = tensors[name].detach().to("cpu", torch.float32).contiguous().numpy()
            yield memoryview(array.astype("<f4", copy=False)).cast("B")

    return stream_file(sink, _header_bytes(tensors, metadata, codec), blocks())


def stream_file(sink: ByteSink, header: bytes,
                blocks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write a safetensors file (its header's length, the header, then the tensor bytes in
    order) into `sink`, hashing as it goes; returns (sha256, size)."""
    digest = hashlib.sha256()
    total = 0
    for data in itertools.chain((struct.pack("<Q", len(header)), header), blocks):
        digest.update(data)
        sink.write(data)
        total += len(data)
    return digest.hexdigest(), total


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object],
                   codec: str = "fp32") -> bytes:
    """Encode named tensors as deterministic safetensors bytes with FedDiffuse metadata."""
    buffer = io.BytesIO()
    write_tensors(buffer, tensors, metadata, codec)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_header(data: bytes) -> tuple[dict, int]:
    """Parse and check the safetensors header without touching the tensor bytes.

    Returns (header dict, offset of the data section). Raises WireFormatError.
    """
    if len(data) < 8:
        raise WireFormatError("file is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise WireFormatError(f"safetensors header of {n} bytes exceeds the limit")
    if 8 + n > len(data):
        raise WireFormatError("safetensors header runs past the end of the file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    # ValueError covers bad JSON and integers too long to parse; RecursionError deep nesting.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireFormatError("safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise WireFormatError("safetensors header is not a JSON object")
    return header, 8 + n


def check_layout(header: Mapping[str, object],
                 expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> int:
    """Check a parsed header on its own, before any tensor byte is read; returns the data size.

    Every entry must be ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` with
    ``end - begin == 4 * prod(shape)``, and the entries must tile the data section with no gap
    or overlap. With `expected_shapes`, the names must be exactly its keys and the shapes must
    match. This lets a receiver validate a file while streaming it to disk (the hub), with the
    tensor bytes then checked chunk by chunk. Raises WireFormatError.
    """
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise WireFormatError("safetensors metadata must map strings to strings")
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireFormatError(f"tensor {name!r} has a malformed header entry")
        shape, offsets = info["shape"], info["data_offsets"]
        if info["dtype"] != "F32":
            raise WireFormatError(f"tensor {name!r} must be F32")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise WireFormatError(f"tensor {name!r} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise WireFormatError(f"tensor {name!r} has malformed data offsets")
        if offsets[1] - offsets[0] != 4 * math.prod(shape):
            raise WireFormatError(f"tensor {name!r}: its byte range does not match its shape")
        spans.append((offsets[0], offsets[1]))
    if expected_shapes is not None:
        names = set(header) - {"__metadata__"}
        missing = set(expected_shapes) - names
        extra = names - set(expected_shapes)
        if missing or extra:
            raise WireFormatError(
                f"tensor names do not match: {len(missing)} missing, {len(extra)} unexpected"
            )
        for name, shape in expected_shapes.items():
            got = header[name]["shape"]  # type: ignore[index]
            if tuple(got) != tuple(shape):
                raise WireFormatError(f"tensor {name!r} has shape {got}, expected {list(shape)}")
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise WireFormatError("tensor data ranges overlap or leave gaps")
        end = stop
    return end


def decode_tensors(data: bytes, expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   require_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode safetensors bytes, checking names, dtype, shapes and finiteness.

    With `expected_shapes`, the names must be exactly those keys and the shapes must match.
    Raises WireFormatError on anything else.
    """
    header, data_start = read_header(data)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireFormatError("safetensors metadata must map strings to strings")
    if expected_shapes is not None:
        if check_layout(header, expected_shapes) != len(data) - data_start:
            raise WireFormatError("the tensor data does not fill the file exactly")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WireFormatError(f"not a valid safetensors file: {exc}") from exc
    if require_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise WireFormatError(f"tensor {name!r} holds NaN or infinite values")
    return tensors, dict(metadata)


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o077)  # elsewhere: set and restore at once
    os.umask(current)
    return current


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one.

    The file is private (0600) unless `mode` is given, e.g. 0o666 for a picture meant to be
    shared, which the process umask then narrows as for any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_weights(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, object]) -> int:
    """Atomically write a weights file; returns its size in bytes."""
    if "preset" not in metadata and PREFIX + "preset" not in metadata:
        raise ValueError("a weights file must record its preset")
    data = encode_tensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a FedDiffuse weights file (safetensors; never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No weights file at {path}; give the path of a .safetensors file.")
    try:
        return decode_tensors(path.read_bytes(), require_finite=False)
    except WireFormatError as exc:
        raise UserError(f"{path} is not a FedDiffuse weights file ({exc}).") from exc


def load_model(path: str | Path):
    """Build the UNet recorded in a weights file and load its weights. Returns (model, meta)."""
    from .model import build_unet, get_preset  # local: keep wire importable without the model

    tensors, meta = load_weights(path)
    preset = read_metadata_value(meta, "preset")
    if preset is None:
        raise UserError(f"{path} does not record its preset; it was not written by FedDiffuse.")
    model = build_unet(get_preset(preset))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not hold a complete {preset} model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors).")
    return model, meta


def payload_bytes(num_params: int, header_bytes: int) -> int:
    """Size of an fp32 safetensors payload: 8-byte length, header, 4 bytes per parameter."""
    return 8 + header_bytes + 4 * num_params
