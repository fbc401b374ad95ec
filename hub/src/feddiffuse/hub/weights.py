"""The hub's own weights files (global models, segment files): deterministic, streamed.

A global version is named by the sha256 of its file, so the same tensors and metadata must
give the same bytes in every process (redoing an aggregation after a crash must reproduce
the version). The core's `wire.write_tensors` guarantees that and streams tensor by tensor;
this module adds the hub's metadata conventions and blob handling around it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.wire import ByteSink, encode_tensors, write_tensors

from .blobs import BlobStore

ALL_KEY = ",".join(SEGMENTS)  # the segments key of a whole model


def write_weights(sink: ByteSink, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, object]) -> tuple[str, int]:
    """Write fp32 `tensors` as safetensors to `sink`; returns (sha256, bytes written)."""
    return write_tensors(sink, tensors, metadata)


def encode_weights(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> bytes:
    return encode_tensors(tensors, metadata)


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
