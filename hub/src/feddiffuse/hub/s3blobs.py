"""The blobs in an S3 bucket (boto3; AWS or any S3-compatible service such as SeaweedFS,
MinIO or Ceph), shared by every replica of a hub.

Layout: `s3://BUCKET/PREFIX/<sha256>.safetensors`, the blob folder's names. An upload streams
to the bucket as it arrives: its bytes go out in parts of PART_SIZE (a multipart upload to a
temporary key `PREFIX/.tmp-<random>.part`), so a body is never held in memory, only one part
of it. A body smaller than a part is sent in one PUT straight to its final key when it is
committed; a bigger one is completed under its temporary key and copied (inside the service)
to its final key. Readers only ever see final keys, whose bytes hash to their name.

The upload check opens the body with the safetensors library, which wants a file: a
temporary blob keeps a local, sparse shadow of it (its first bytes, up to the end of the
safetensors header, then a hole up to its size), so that check sees the same layout without
the tensors on local disk.

Credentials come from boto3's usual places (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a
profile, an instance role), never from the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from feddiffuse.shared.errors import UserError

from .blobs import SUFFIX, TEMP_PREFIX, BlobStore, TempBlob, is_sha256

PART_SIZE = 8 * 1024 * 1024  # S3's smallest part is 5 MiB (but the last)
READ_CHUNK = 256 * 1024
SHADOW_LIMIT = 64 * 1024 * 1024  # at most this much of a body's head is kept locally


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of s3://BUCKET/PREFIX; UserError if unfit."""
    parts = urlsplit(url)
    bucket = parts.netloc
    if parts.scheme != "s3" or not (3 <= len(bucket) <= 63) or "@" in bucket or ":" in bucket:
        raise UserError(f"--blobs takes s3://BUCKET/PREFIX (a bucket name of 3 to 63 "
                        f"characters), not {url[:80]!r}.")
    prefix = parts.path.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _client(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=64, retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, config=config,
                        region_name=os.environ.get("AWS_DEFAULT_REGION")
                        or os.environ.get("AWS_REGION") or "us-east-1")


def _not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3TempBlob(TempBlob):
    """A blob being written to the bucket, part by part; `path` is its local shadow."""

    def __init__(self, store: S3BlobStore) -> None:  # noqa: D107 - no folder: a shadow file
        self._store = store
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".shadow", dir=store.spool)
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.size = 0
        self.key = f"{store.prefix}{TEMP_PREFIX}{uuid.uuid4().hex}.part"
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._head = bytearray()  # the first bytes, until the header's end is known
        self._shadow_end: int | None = None
        self._synced = False
        self._completed = False  # the temporary key exists (a multipart upload finished)

    def write(self, data: bytes | memoryview) -> None:
        if self._synced:
            raise RuntimeError("the temporary blob was synced already")
        self._shadow(data)
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= PART_SIZE:
            self._send_part(bytes(self._buffer[:PART_SIZE]))
            del self._buffer[:PART_SIZE]

    def _shadow(self, data: bytes | memoryview) -> None:
        """Write the body's head (8-byte length and JSON header) to the local shadow."""
        if self._shadow_end is None:
            self._head += data[:max(0, 8 - len(self._head))]
            if len(self._head) >= 8:
                header_len = int.from_bytes(self._head[:8], "little")
                self._shadow_end = min(8 + header_len, SHADOW_LIMIT)
        end = self._shadow_end if self._shadow_end is not None else 8
        if self.size < end:
            self.file.write(data[:end - self.size])

    def _send_part(self, data: bytes) -> None:
        s3, bucket = self._store.s3, self._store.bucket
        if self._upload_id is None:
            self._upload_id = s3.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
        n = len(self._parts) + 1
        etag = s3.upload_part(Bucket=bucket, Key=self.key, UploadId=self._upload_id,
                              PartNumber=n, Body=data)["ETag"]
        self._parts.append({"PartNumber": n, "ETag": etag})

    def sync(self) -> None:
        """The whole body is in: its shadow gets its full size (a sparse file); a multipart
        upload sends its last part and completes (a small body waits for `commit`)."""
        if self._synced:
            return
        self.file.flush()
        self.file.truncate(self.size)
        self.file.close()
        if self._upload_id is not None:
            if self._buffer:
                self._send_part(bytes(self._buffer))
                self._buffer = bytearray()
            self._store.s3.complete_multipart_upload(
                Bucket=self._store.bucket, Key=self.key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts})
            self._upload_id = None
            self._completed = True
        self._synced = True

    def put_final(self, key: str) -> None:
        s3, bucket = self._store.s3, self._store.bucket
        if self._completed:
            s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket,
                                                                "Key": self.key})
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=bytes(self._buffer))
            self._buffer = bytearray()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._buffer = bytearray()
        s3, bucket = self._store.s3, self._store.bucket
        with contextlib.suppress(Exception):  # a leftover is removed by remove_temporaries
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                s3.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=upload_id)
            if self._completed:
                self._completed = False
                s3.delete_object(Bucket=bucket, Key=self.key)


class S3BlobStore(BlobStore):
    def __init__(self, s3: Any, bucket: str, prefix: str, spool: Path) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.spool = spool

    @classmethod
    def connect(cls, url: str, *, endpoint: str | None = None) -> S3BlobStore:
        """The bucket of `url`, checked to be reachable; UserError (one sentence) if not."""
        bucket, prefix = parse_s3_url(url)
        s3 = _client(endpoint)
        where = f"s3://{bucket}/{prefix}" + (f" at {endpoint}" if endpoint else "")
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else \
                type(exc).__name__
            raise UserError(f"Cannot use the bucket {where}: {detail}. Check that it exists, "
                            "the --s3-endpoint, and the AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY in the environment.") from None
        spool = Path(tempfile.mkdtemp(prefix=f"feddiffuse-hub-spool-{os.getpid()}-"))
        return cls(s3, bucket, prefix, spool)

    def key(self, sha256: str) -> str:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self.prefix}{sha256}{SUFFIX}"

    def exists(self, sha256: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except Exception as exc:
            if _not_found(exc):
                return False
            raise
        return True

    def temp(self) -> S3TempBlob:
        return S3TempBlob(self)

    def commit(self, temp: TempBlob, sha256: str) -> None:
        assert isinstance(temp, S3TempBlob)
        temp.sync()
        if not self.exists(sha256):  # same bytes already stored: a no-op
            temp.put_final(self.key(sha256))
        temp.discard()

    def remove(self, sha256: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def iter_range(self, sha256: str, start: int, stop: int) -> Iterator[bytes]:
        if stop <= start:
            return
        end = "" if stop >= 1 << 62 else str(stop - 1)
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(sha256),
                                      Range=f"bytes={start}-{end}")["Body"]
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"blob {sha256[:12]}... is not in the bucket") from None
            raise
        try:
            yield from body.iter_chunks(READ_CHUNK)
        finally:
            body.close()

    @contextlib.contextmanager
    def verified_file(self, sha256: str) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(prefix=".get-", suffix=SUFFIX, dir=self.spool)
        path = Path(name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for block in self.iter_range(sha256, 0, 1 << 62):
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != sha256:
                raise RuntimeError(f"blob {sha256[:12]}... is damaged in the bucket (its "
                                   "sha256 changed)")
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)

    def _objects(self) -> Iterator[dict]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=self.prefix)
        for page in pages:
            yield from page.get("Contents", [])

    def remove_temporaries(self, older_than_s: float | None = None) -> int:
        cutoff = None if older_than_s is None else time.time() - older_than_s
        removed = 0
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket,
                                                 Prefix=f"{self.prefix}{TEMP_PREFIX}")
        for u in uploads.get("Uploads", []):
            if cutoff is None or u["Initiated"].timestamp() < cutoff:
                with contextlib.suppress(Exception):
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"],
                                                   UploadId=u["UploadId"])
                    removed += 1
        for o in self._objects():
            name = o["Key"][len(self.prefix):]
            if name.startswith(TEMP_PREFIX) and (
                    cutoff is None or o["LastModified"].timestamp() < cutoff):
                self.s3.delete_object(Bucket=self.bucket, Key=o["Key"])
                removed += 1
        return removed

    def collect_garbage(self, referenced: Iterable[str], older_than_s: float | None = None
                        ) -> int:
        keep = set(referenced)
        cutoff = None if older_than_s is None else time.time() - older_than_s
        removed = 0
        for o in self._objects():
            name = o["Key"][len(self.prefix):]
            sha = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
            if is_sha256(sha) and sha not in keep and (
                    cutoff is None or o["LastModified"].timestamp() < cutoff):
                self.s3.delete_object(Bucket=self.bucket, Key=o["Key"])
                removed += 1
        return removed
