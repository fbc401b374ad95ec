"""The blob folder: content-addressed safetensors files, written so no half file is ever seen.

Every blob is `<sha256>.safetensors`, named by the sha256 of its bytes: a global version, a
segment file built from one, or an accepted upload. A blob is written to a temporary file in
the same folder, fsynced, then renamed into place (and the folder fsynced), so readers see the
whole file or none. Temporary files left by a crash (`.tmp-*`) are removed when the hub starts;
blobs no database row refers to (written just before a crash, never recorded) are collected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


class BlobStore:
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

    def commit(self, temp: TempBlob, sha256: str) -> Path:
        """Move a synced temporary file into place as blob `sha256` (the caller hashed it)."""
        temp.sync()
        dest = self.path(sha256)
        if dest.is_file():  # same bytes already stored: content addressing makes this a no-op
            temp.discard()
            return dest
        os.replace(temp.path, dest)
        fsync_dir(self.folder)
        return dest

    def write_bytes(self, data: bytes) -> str:
        """Store `data` atomically; returns its sha256 (its name)."""
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        temp = self.temp()
        try:
            temp.write(data)
            self.commit(temp, sha)
        except BaseException:
            temp.discard()
            raise
        return sha

    def remove(self, sha256: str) -> None:
        """Delete a blob that no record refers to (the caller knows)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def read_prefix(self, sha256: str, size: int) -> bytes:
        with open(self.path(sha256), "rb") as f:
            return f.read(size)

    def hash_file(self, sha256: str) -> str:
        """The sha256 of blob `sha256` as it is on disk now (to detect corruption)."""
        h = hashlib.sha256()
        with open(self.path(sha256), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def remove_temporaries(self) -> int:
        """Delete what a crash left mid-write. Only safe while no writer runs (at start)."""
        removed = 0
        for p in self.folder.glob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        return removed

    def collect_garbage(self, referenced: Iterable[str]) -> int:
        """Delete blobs no record refers to. Only safe while no writer runs (at start)."""
        keep = set(referenced)
        removed = 0
        for p in self.folder.glob(f"*{SUFFIX}"):
            name = p.name[: -len(SUFFIX)]
            if is_sha256(name) and name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
        return removed
