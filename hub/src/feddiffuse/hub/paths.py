"""The layout of a hub directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from feddiffuse.shared.errors import UserError

DB_NAME = "hub.sqlite3"
DIR_MODE = 0o700  # the hub directory and its blob folder hold token hashes and every upload
BLOBS_NAME = "blobs"
LOCK_NAME = "serve.lock"


@dataclass(frozen=True)
class HubPaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def blobs(self) -> Path:
        return self.root / BLOBS_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    def loose_permissions(self) -> str | None:
        """The hub directory's mode when group or others may enter it, else None."""
        mode = self.root.stat().st_mode & 0o777
        return f"{mode:o}" if mode & 0o077 else None

    def require_hub(self) -> HubPaths:
        if not self.db.is_file() or not self.blobs.is_dir():
            raise UserError(f"There is no hub in {self.root}; create one with "
                            f"`feddiffuse-hub init {self.root} ...` or give the right folder.")
        return self


class ServeLock:
    """An exclusive lock on the hub directory held while serving (freed by the OS on a crash)."""

    def __init__(self, paths: HubPaths) -> None:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"Another hub process is serving {paths.root}; stop it first."
                            ) from None
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None
