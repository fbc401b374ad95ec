"""Where a hub keeps its state and its blobs: in its directory (SQLite and a blob folder, the
default), or in PostgreSQL and an S3 bucket shared by several replicas.

A hub directory of the second kind holds only `hub.json`, which names the store and the
bucket, never a credential: the PostgreSQL password comes from PGPASSWORD, ~/.pgpass or a
libpq service file, the S3 keys from the AWS_* variables (or boto3's other usual places).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from feddiffuse.shared.errors import UserError

from .blobs import BlobStore, FolderBlobStore
from .paths import HubPaths
from .store import HubStore, open_store

CONFIG_NAME = "hub.json"
CONFIG_FORMAT = 1


@dataclass(frozen=True)
class Backends:
    store: str | None = None  # postgresql://USER@HOST:PORT/DB; None: SQLite in the directory
    blobs: str | None = None  # s3://BUCKET/PREFIX; None: the blob folder in the directory
    s3_endpoint: str | None = None  # an S3-compatible service's URL; None: AWS's

    @property
    def embedded(self) -> bool:
        """SQLite and the blob folder, in the hub directory (one `serve` at a time)."""
        return self.store is None and self.blobs is None

    @property
    def replicated(self) -> bool:
        """State in PostgreSQL: any number of `serve` processes may share it."""
        return self.store is not None

    def validated(self) -> Backends:
        if self.store is not None:
            from .store.postgres import check_url

            check_url(self.store)
        if self.blobs is not None:
            from .s3blobs import parse_s3_url

            parse_s3_url(self.blobs)
        if self.s3_endpoint is not None:
            if self.blobs is None:
                raise UserError("--s3-endpoint needs --blobs s3://BUCKET/PREFIX.")
            if not self.s3_endpoint.startswith(("http://", "https://")) or "@" in \
                    self.s3_endpoint:
                raise UserError("--s3-endpoint takes an http(s)://HOST:PORT URL without "
                                "credentials (they come from the AWS_* variables).")
        return self

    # -- the hub directory's hub.json ---------------------------------------------------------

    @classmethod
    def of(cls, paths: HubPaths) -> Backends:
        """The backends of the hub in `paths` (which must hold one)."""
        config = paths.root / CONFIG_NAME
        if not config.is_file():
            paths.require_hub()
            return cls()
        try:
            data = json.loads(config.read_text())
            return cls(data.get("store"), data.get("blobs"), data.get("s3_endpoint")
                       ).validated()
        except (ValueError, AttributeError) as exc:
            raise UserError(f"{config} is not a hub configuration ({exc}); restore it or "
                            "write it again with `feddiffuse-hub init`.") from None

    def save(self, paths: HubPaths) -> None:
        """Write hub.json (0600; it names servers, no credential)."""
        config = paths.root / CONFIG_NAME
        data = {"format": CONFIG_FORMAT, **asdict(self)}
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    # -- opening them -----------------------------------------------------------------------

    def open_store(self, paths: HubPaths | None, *, create: bool = False) -> HubStore:
        if self.store is not None:
            return open_store(self.store, create=create)
        assert paths is not None
        return open_store(paths.db, create=create)

    def open_blobs(self, paths: HubPaths | None) -> BlobStore:
        if self.blobs is None:
            assert paths is not None
            return FolderBlobStore(paths.blobs)
        from .s3blobs import S3BlobStore

        return S3BlobStore.connect(self.blobs, endpoint=self.s3_endpoint)


def open_hub_store(root: str | Path) -> HubStore:
    """The store of the hub directory `root` (the CLI's token and round commands)."""
    paths = HubPaths(Path(root))
    return Backends.of(paths).open_store(paths)
