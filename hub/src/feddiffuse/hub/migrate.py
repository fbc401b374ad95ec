"""`feddiffuse-hub migrate`: an embedded hub (SQLite and its blob folder) moved into
PostgreSQL, and its blobs into S3 when a bucket is given.

With `serve` stopped (the serve lock is taken for the whole move): every referenced blob is
copied first (each checked against its sha256 on the way), then every row of every table is
copied in one PostgreSQL transaction and counted back; only then does the directory's
hub.json name the new backends, and the SQLite file is renamed `hub.sqlite3.migrated` (kept,
never served again). A failure before that changes nothing in the directory.
"""

from __future__ import annotations

from pathlib import Path

from feddiffuse.shared.errors import UserError

from .backends import CONFIG_NAME, Backends
from .blobs import BlobStore, FolderBlobStore
from .paths import HubPaths, ServeLock
from .store.postgres import PostgresStore, describe
from .store.sqlite import SqliteStore

MIGRATED_SUFFIX = ".migrated"


def _copy_blobs(src: BlobStore, dst: BlobStore, names: set[str]) -> int:
    copied = 0
    for sha in sorted(names):
        if dst.exists(sha):
            continue
        with src.verified_file(sha) as path:
            temp = dst.temp()
            try:
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        temp.write(block)
                dst.commit(temp, sha)
            finally:
                temp.discard()
        copied += 1
    return copied


def migrate_hub(src_dir: str | Path, store_url: str, *, blobs: str | None = None,
                s3_endpoint: str | None = None) -> str:
    """Move the embedded hub in `src_dir`; returns a sentence saying what moved."""
    paths = HubPaths(Path(src_dir))
    if (paths.root / CONFIG_NAME).is_file():
        raise UserError(f"{paths.root} is not an embedded hub (it has a {CONFIG_NAME}); "
                        "nothing to migrate.")
    paths.require_hub()
    target = Backends(store_url, blobs, s3_endpoint).validated()
    lock = ServeLock(paths)
    try:
        src = SqliteStore.connect(paths.db)
        try:
            dst = PostgresStore.connect(store_url, create=True)
            try:
                referenced = src.referenced_blobs()
                src_blobs = FolderBlobStore(paths.blobs)
                missing = sorted(s for s in referenced if not src_blobs.exists(s))
                if missing:
                    raise UserError(f"{len(missing)} blob(s) the database refers to are "
                                    f"missing from {paths.blobs} (e.g. {missing[0][:12]}...); "
                                    "restore them before migrating.")
                copied = 0
                if target.blobs is not None:
                    dst_blobs = target.open_blobs(None)
                    try:
                        copied = _copy_blobs(src_blobs, dst_blobs, referenced)
                    finally:
                        dst_blobs.close()
                tables = list(src.dump())
                rows = dst.load(iter(tables))
                for table, columns, expected in tables:
                    got = dst.dump_table(table, columns)
                    if len(got) != len(expected):
                        raise RuntimeError(f"table {table}: {len(got)} rows arrived of "
                                           f"{len(expected)}")
                uploads = sum(len(r) for t, _, r in tables if t == "uploads")
            finally:
                dst.close()
        finally:
            src.close()
        Backends(store_url, blobs, s3_endpoint).save(paths)
        paths.db.rename(paths.db.with_name(paths.db.name + MIGRATED_SUFFIX))
    finally:
        lock.release()
    where = describe(store_url)
    blob_note = (f"; {copied} blob(s) copied to {blobs}" if blobs is not None else
                 f"; the blobs stay in {paths.blobs}")
    return (f"Moved {rows} row(s), {uploads} upload(s) among them, into {where}{blob_note}. "
            f"{paths.root}/{CONFIG_NAME} now names them; the SQLite file is kept as "
            f"{paths.db.name}{MIGRATED_SUFFIX}.")
