"""The blobs: content-addressed safetensors files, written so no half file is ever seen.

Every blob is `<sha256>.safetensors`, named by the sha256 of its bytes: a global version, a
segment file built from one, or an accepted upload. `BlobStore` is the interface; this module
has the blob folder in the hub directory (`FolderBlobStore`, the default), `s3blobs.py` an S3
bucket. In the folder a blob is written to a temporary file in the same folder, fsynced, then
renamed into place (and the folder fsynced), so readers see the whole file or none. Temporary
files left by a crash (`.tmp-*`) are removed when the hub starts; blobs no database row refers
to (written just before a crash, never recorded) are collected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
READ_CHUNK = 256 * 1024


def is_sha256(value: str) -> bool:
    return bool(_SHA256.fullmatch(value))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempBlob:
    """A temporary file in the blob folder that a writer fills, then commits or discards."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=folder)
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Flush and fsync the bytes written so far, and close the file."""
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore(ABC):
    """Content-addressed blobs. A writer fills a `temp()`, then `commit`s it under its sha256
    (the caller hashed it); only committed blobs are ever seen by readers."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def temp(self) -> TempBlob:
        """A temporary blob to write; its `path` is a local file with the bytes' layout (the
        upload check opens it with the safetensors library)."""

    @abstractmethod
    def commit(self, temp: TempBlob, sha256: str) -> None:
        """Make a temporary blob blob `sha256` (a no-op if that blob exists)."""

    def write_bytes(self, data: bytes) -> str:
        """Store `data` atomically; returns its sha256 (its name)."""
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        temp = self.temp()
        try:
            temp.write(data)
            self.commit(temp, sha)
        finally:
            temp.discard()
        return sha

    @abstractmethod
    def remove(self, sha256: str) -> None:
        """Delete a blob that no record refers to (the caller knows)."""

    @abstractmethod
    def iter_range(self, sha256: str, start: int, stop: int) -> Iterator[bytes]:
        """Bytes [start, stop) of a blob, streamed in chunks."""

    def read_bytes(self, sha256: str) -> bytes:
        return b"".join(self.iter_range(sha256, 0, 1 << 62))

    def read_prefix(self, sha256: str, size: int) -> bytes:
        return b"".join(self.iter_range(sha256, 0, size))

    def hash_file(self, sha256: str) -> str:
        """The sha256 of blob `sha256` as it is stored now (to detect corruption)."""
        h = hashlib.sha256()
        for block in self.iter_range(sha256, 0, 1 << 62):
            h.update(block)
        return h.hexdigest()

    @abstractmethod
    def verified_file(self, sha256: str) -> contextlib.AbstractContextManager[Path]:
        """A local file holding blob `sha256`, whose bytes were checked to hash to its name
        (RuntimeError if they do not: the blob is damaged)."""

    @abstractmethod
    def remove_temporaries(self, older_than_s: float | None = None) -> int:
        """Delete what a crash left mid-write (only those older than `older_than_s`, when
        given: writers of other processes may be at work). Without it, only safe while no
        writer runs (at start of the one process that serves)."""

    @abstractmethod
    def collect_garbage(self, referenced: Iterable[str], older_than_s: float | None = None
                        ) -> int:
        """Delete blobs no record refers to (see `remove_temporaries` for `older_than_s`)."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the store holds locally."""


class FolderBlobStore(BlobStore):
    """The blob folder in the hub directory."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.folder / f"{sha256}{SUFFIX}"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def temp(self) -> TempBlob:
        return TempBlob(self.folder)

    def commit(self, temp: TempBlob, sha256: str) -> None:
        """Move a synced temporary file into place as blob `sha256` (the caller hashed it)."""
        temp.sync()
        dest = self.path(sha256)
        if dest.is_file():  # same bytes already stored: content addressing makes this a no-op
            temp.discard()
            return
        os.replace(temp.path, dest)
        fsync_dir(self.folder)

    def remove(self, sha256: str) -> None:
        """Delete a blob that no record refers to (the caller knows)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def read_prefix(self, sha256: str, size: int) -> bytes:
        with open(self.path(sha256), "rb") as f:
            return f.read(size)

    def iter_range(self, sha256: str, start: int, stop: int) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(start)
            remaining = stop - start
            while remaining > 0:
                data = f.read(min(READ_CHUNK, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data

    def hash_file(self, sha256: str) -> str:
        """The sha256 of blob `sha256` as it is on disk now (to detect corruption)."""
        h = hashlib.sha256()
        with open(self.path(sha256), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @contextlib.contextmanager
    def verified_file(self, sha256: str) -> Iterator[Path]:
        if self.hash_file(sha256) != sha256:
            raise RuntimeError(f"blob {sha256[:12]}... is damaged on disk (its sha256 changed)")
        yield self.path(sha256)

    def remove_temporaries(self, older_than_s: float | None = None) -> int:
        return _unlink_old(self.folder.glob(f"{TEMP_PREFIX}*"), older_than_s)

    def close(self) -> None:
        """The folder holds nothing open."""

    def collect_garbage(self, referenced: Iterable[str], older_than_s: float | None = None
                        ) -> int:
        keep = set(referenced)
        return _unlink_old((p for p in self.folder.glob(f"*{SUFFIX}")
                            if is_sha256(p.name[: -len(SUFFIX)])
                            and p.name[: -len(SUFFIX)] not in keep), older_than_s)


def _unlink_old(paths: Iterable[Path], older_than_s: float | None) -> int:
    removed = 0
    cutoff = None if older_than_s is None else time.time() - older_than_s
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            if cutoff is not None and p.stat().st_mtime > cutoff:
                continue
            p.unlink()
            removed += 1
    return removed
