"""The hub's own weights files (global models, segment files): deterministic, streamed.

A global version is named by the sha256 of its file, so the same tensors and metadata must
give the same bytes in every process (redoing an aggregation after a crash must reproduce
the version). The core's `wire.write_tensors` guarantees that and streams tensor by tensor;
this module adds the hub's metadata conventions and blob handling around it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from feddiffuse.shared.codecs import Codec, decode_payload, write_payload
from feddiffuse.shared.payloads import ALL_KEY, global_metadata
from feddiffuse.shared.wire import ByteSink, encode_tensors, write_tensors

from .blobs import BlobStore

__all__ = ["ALL_KEY", "DENSE_KEY", "delta_key", "global_metadata"]
# Segment-file keys beyond a set of segments: the initial model in the downlink codec's dense
# form, and the update from an older version to this one in the downlink codec.
DENSE_KEY = ALL_KEY + "@dense"


def delta_key(segments_key: str, base_version: str) -> str:
    return f"{segments_key}@{base_version}"


def write_weights(sink: ByteSink, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, object]) -> tuple[str, int]:
    """Write fp32 `tensors` as safetensors to `sink`; returns (sha256, bytes written)."""
    return write_tensors(sink, tensors, metadata)


def encode_weights(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> bytes:
    return encode_tensors(tensors, metadata)


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


def write_encoded_blob(blobs: BlobStore, wire: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, object], codec: Codec) -> tuple[str, int]:
    """Stream encoded tensors (`codecs.encode`) into the blob folder; returns (sha256, bytes)."""
    temp = blobs.temp()
    try:
        sha, size = write_payload(temp, wire, metadata, codec)
        blobs.commit(temp, sha)
    finally:
        temp.discard()
    return sha, size


def load_decoded(blobs: BlobStore, sha: str, codec: Codec,
                 shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Blob `sha` (a payload in `codec`, hash checked) decoded to fp32 tensors."""
    data = blobs.read_bytes(sha)
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"blob {sha[:12]}... is damaged on disk (its sha256 changed)")
    return decode_payload(data, codec, shapes)[0]


def load_verified(blobs: BlobStore, sha: str) -> dict[str, torch.Tensor]:
    """Load blob `sha`, after checking that its bytes still hash to its name."""
    with blobs.verified_file(sha) as path:
        return load_file(path)  # safetensors: never unpickled


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
