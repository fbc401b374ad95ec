"""Writing the hub's own weights files (global models, segment files): deterministic, streamed.

A global version is named by the sha256 of its file, so the same tensors and metadata must
give the same bytes in every process (redoing an aggregation after a crash must reproduce
the version). safetensors' own writer stores the metadata in hash-map order, which changes
between processes; and it builds the whole file in memory. This writer sorts tensors and
keys, and streams tensor by tensor (no copy of the model in memory). The result is a plain
safetensors file with FedDiffuse metadata, read by `wire.decode_tensors` like any other.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import torch
from safetensors.torch import load_file

from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.wire import FORMAT_VERSION, PREFIX

from .blobs import BlobStore

ALL_KEY = ",".join(SEGMENTS)  # the segments key of a whole model


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> bytes:
    meta = {f"{PREFIX}format_version": FORMAT_VERSION, f"{PREFIX}codec": "fp32"}
    meta.update({(k if k.startswith(PREFIX) else PREFIX + k): str(v)
                 for k, v in metadata.items()})
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name in sorted(tensors):
        size = 4 * tensors[name].numel()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes


def write_weights(sink: _Sink, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, object]) -> tuple[str, int]:
    """Write fp32 `tensors` as safetensors to `sink`; returns (sha256, bytes written)."""
    digest = hashlib.sha256()
    total = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal total
        digest.update(data)
        sink.write(data)
        total += len(data)

    header = _header(tensors, metadata)
    put(struct.pack("<Q", len(header)))
    put(header)
    for name in sorted(tensors):
        array = tensors[name].detach().to("cpu", torch.float32).contiguous().numpy()
        put(memoryview(array.astype("<f4", copy=False)).cast("B"))
    return digest.hexdigest(), total


def encode_weights(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> bytes:
    buffer = io.BytesIO()
    write_weights(buffer, tensors, metadata)
    return buffer.getvalue()


def global_metadata(preset: str, round_index: int) -> dict[str, object]:
    """Metadata of a full global model file; `round_index` is the round it opens."""
    return {"kind": "global", "preset": preset, "round": round_index,
            "completed_rounds": round_index - 1, "segments": ALL_KEY}


def encode_global(state: Mapping[str, torch.Tensor], preset: str, round_index: int) -> bytes:
    """The full global model file, whose sha256 is its version."""
    return encode_weights(state, global_metadata(preset, round_index))


def write_blob(blobs: BlobStore, tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, object]) -> tuple[str, int]:
    """Stream a weights file into the blob folder (atomically); returns (sha256, bytes)."""
    temp = blobs.temp()
    try:
        sha, size = write_weights(temp, tensors, metadata)
        blobs.commit(temp, sha)
    finally:
        temp.discard()
    return sha, size


def load_verified(blobs: BlobStore, sha: str) -> dict[str, torch.Tensor]:
    """Load blob `sha`, after checking that its bytes still hash to its name."""
    if blobs.hash_file(sha) != sha:
        raise RuntimeError(f"blob {sha[:12]}... is damaged on disk (its sha256 changed)")
    return load_file(blobs.path(sha))  # safetensors: never unpickled


def header_prefix(blobs: BlobStore, sha: str) -> bytes:
    """The 8-byte length and JSON header of blob `sha`."""
    head = blobs.read_prefix(sha, 8)
    return blobs.read_prefix(sha, 8 + int.from_bytes(head, "little"))


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run PyTorch on one thread: aggregation is a stream of small element-wise ops, which
    intra-op threads slow down (25x on a busy 2-core machine) rather than speed up."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)
