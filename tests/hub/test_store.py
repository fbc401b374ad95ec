"""The blob stores (the folder, an S3 bucket) and the stores (SQLite, PostgreSQL): atomic
files, content addresses, one-step changes. One suite, run against each implementation."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from feddiffuse.hub import Hub
from feddiffuse.hub.backends import open_hub_store
from feddiffuse.hub.blobs import FolderBlobStore
from feddiffuse.hub.errors import UserError
from feddiffuse.hub.s3blobs import PART_SIZE, S3BlobStore
from feddiffuse.hub.store import CLOSING, OPEN
from feddiffuse.hub.store.base import (
    NewEvent,
    ParticipantRow,
    RoundNotOpen,
    RoundRow,
    TokenRevoked,
    UploadRow,
)


class Listing:
    """What a blob store holds, by name (files in the folder, keys in the bucket)."""

    def __init__(self, blobs, names, put_other) -> None:
        self.blobs, self.names, self.put_other = blobs, names, put_other


@pytest.fixture(params=["folder", "s3"])
def blob_store(request, tmp_path) -> Listing:
    if request.param == "folder":
        blobs = FolderBlobStore(tmp_path)
        return Listing(blobs, lambda: sorted(p.name for p in tmp_path.iterdir()),
                       lambda: (tmp_path / "notes.txt").write_text("not a blob"))
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    blobs = S3BlobStore.connect(f"s3://{bucket}/pre/fix", endpoint=s3.endpoint)
    request.addfinalizer(blobs.close)

    def names() -> list[str]:
        return [k.removeprefix("pre/fix/") for k in s3.keys(bucket)]

    return Listing(blobs, names, lambda: s3.client().put_object(
        Bucket=bucket, Key="pre/fix/notes.txt", Body=b"not a blob"))


def test_blobs_are_content_addressed_and_written_whole(blob_store):
    blobs = blob_store.blobs
    sha = blobs.write_bytes(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert blobs.read_bytes(sha) == b"hello" and blobs.hash_file(sha) == sha
    assert blobs.read_prefix(sha, 3) == b"hel" and b"".join(blobs.iter_range(sha, 1, 4)) == b"ell"
    assert blobs.write_bytes(b"hello") == sha
    assert blob_store.names() == [f"{sha}.safetensors"]
    with blobs.verified_file(sha) as path:
        assert path.read_bytes() == b"hello"
    with pytest.raises(ValueError):
        blobs.exists("../../etc/passwd")


def test_a_temporary_is_invisible_until_committed_and_cleaned_after_a_crash(blob_store):
    blobs = blob_store.blobs
    temp = blobs.temp()
    temp.write(b"half of an upl")
    temp.sync()  # in a bucket: a small body waits for its commit, so nothing is seen
    assert [n for n in blob_store.names() if n.endswith(".safetensors")] == []
    other = blobs.temp()
    other.write(b"whole")
    blobs.commit(other, hashlib.sha256(b"whole").hexdigest())
    blobs.remove_temporaries()  # what the crashed writer left
    assert blob_store.names() == [f"{hashlib.sha256(b'whole').hexdigest()}.safetensors"]
    temp.discard()


def test_a_body_bigger_than_a_part_streams_in_parts_and_keeps_a_sparse_shadow(blob_store):
    """An upload streams to the bucket part by part (a multipart upload); the local file the
    safetensors check opens holds only its head, the rest a hole of the right size."""
    blobs = blob_store.blobs
    body = (16).to_bytes(8, "little") + b'{"a": 1}        ' + bytes(range(256)) * (
        (PART_SIZE * 2 + 1000) // 256)
    temp = blobs.temp()
    for i in range(0, len(body), 1 << 20):
        temp.write(body[i:i + (1 << 20)])
    temp.sync()
    assert temp.path.stat().st_size == len(body)
    assert temp.path.read_bytes()[:24] == body[:24]
    if isinstance(blobs, S3BlobStore):
        assert temp.path.stat().st_blocks * 512 < len(body) // 2  # sparse: no local copy
    sha = hashlib.sha256(body).hexdigest()
    blobs.commit(temp, sha)
    temp.discard()
    assert blobs.hash_file(sha) == sha and blob_store.names() == [f"{sha}.safetensors"]
    assert b"".join(blobs.iter_range(sha, PART_SIZE - 3, PART_SIZE + 3)) == \
        body[PART_SIZE - 3:PART_SIZE + 3]


def test_a_discarded_temporary_leaves_nothing(blob_store):
    blobs = blob_store.blobs
    temp = blobs.temp()
    temp.write(b"x" * (PART_SIZE + 10))  # a multipart upload has begun
    temp.discard()
    assert blob_store.names() == [] and not temp.path.exists()


def test_garbage_collection_keeps_what_is_referenced(blob_store):
    blobs = blob_store.blobs
    keep, drop = blobs.write_bytes(b"keep"), blobs.write_bytes(b"drop")
    blob_store.put_other()
    assert blobs.collect_garbage({keep}, older_than_s=3600) == 0  # too young to be garbage
    assert blobs.collect_garbage({keep}) == 1
    assert blobs.exists(keep) and not blobs.exists(drop)
    assert "notes.txt" in blob_store.names()


def test_the_sqlite_store_is_wal(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice",))
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_the_store_changes_in_single_steps(tmp_path, kit, store_backends):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice",), backends=store_backends)
    store = open_hub_store(setup.root)
    try:
        fed = store.federation()
        row = RoundRow(1, OPEN, fed.current_version, 1.0, None)
        store.open_round(row, [ParticipantRow(1, "alice", ("encoder",), ("encoder",), 1)],
                         NewEvent(1.0, 1, "opened", "x"))
        upload = UploadRow(1, "alice", "ab" * 32, 10, 5, None, ("encoder",), 2.0)
        assert store.add_upload(upload, NewEvent(2.0, 1, "upload", "x"))
        assert not store.add_upload(upload, NewEvent(2.0, 1, "upload", "again"))
        assert len(store.events()) == 4  # created, token, opened, upload: not the refused one
        with pytest.raises(RuntimeError, match="not closing"):  # publish needs 'closing'
            store.publish(1, store.version(fed.current_version), 3.0, True, None, [])
        assert store.round(1).status == OPEN and not store.federation().finished
        assert store.mark_closing(1, "test", 3.0, NewEvent(3.0, 1, "closing", "x"))
        assert store.round(1).status == CLOSING
        assert not store.mark_closing(1, "again", 3.0, NewEvent(3.0, 1, "closing", "x"))
        assert store.referenced_blobs() == {fed.current_version, "ab" * 32}
        assert store.is_referenced("ab" * 32) and not store.is_referenced("cd" * 32)
        with pytest.raises(KeyError):
            store.add_token("alice", "client", "cd" * 32, 4.0)
        store.add_downloads([])
    finally:
        store.close()


def test_an_upload_is_recorded_only_into_an_open_round_with_an_active_token(tmp_path, kit,
                                                                           store_backends):
    """The checks and the write are one step for every process on the store (another
    replica closing the round or revoking the token lands before or after, never between)."""
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"), backends=store_backends)
    store = open_hub_store(setup.root)
    try:
        fed = store.federation()
        store.open_round(RoundRow(1, OPEN, fed.current_version, 1.0, None),
                         [ParticipantRow(1, c, ("encoder",), ("encoder",), 1)
                          for c in ("alice", "bob")], NewEvent(1.0, 1, "opened", "x"))
        assert store.revoke_token("bob", 2.0)
        with pytest.raises(TokenRevoked):
            store.add_upload(UploadRow(1, "bob", "cd" * 32, 10, 5, None, ("encoder",), 2.0),
                             NewEvent(2.0, 1, "upload", "x"))
        assert store.mark_closing(1, "test", 3.0, NewEvent(3.0, 1, "closing", "x"))
        with pytest.raises(RoundNotOpen):
            store.add_upload(UploadRow(1, "alice", "ab" * 32, 10, 5, 0.5, ("encoder",), 4.0),
                             NewEvent(4.0, 1, "upload", "x"))
        assert store.uploads(1) == [] and not store.is_referenced("ab" * 32)
    finally:
        store.close()


def test_totals_and_events_read_back_the_same(tmp_path, kit, store_backends):
    from feddiffuse.hub.store.base import DownloadTotal

    setup = kit.make_hub(tmp_path / "hub", clients=("alice",), backends=store_backends)
    store = open_hub_store(setup.root)
    try:
        store.add_downloads([DownloadTotal(1, "alice", "v", "encoder", 1, 100),
                             DownloadTotal(1, "alice", "v", "decoder", 2, 5)])
        store.add_downloads([DownloadTotal(1, "alice", "v", "encoder", 1, 50)])
        assert store.bytes_out() == {1: 155}
        assert type(store.bytes_out()[1]) is int
        kinds = [e.kind for e in store.events()]
        assert kinds == ["created", "token"] and store.events(1)[0].kind == "token"
        fed = store.federation()
        assert fed.settings == setup.settings.validated() and fed.current_round == 1
    finally:
        store.close()


def test_opening_a_folder_without_a_hub_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no hub"):
        Hub.open(tmp_path)


def test_start_removes_what_a_crash_left_behind(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub")
    blobs = FolderBlobStore(setup.root / "blobs")
    temp = blobs.temp()
    temp.write(b"partial")
    orphan = blobs.write_bytes(b"written but never recorded")
    with Hub.open(setup.root):  # not serving: leaves things alone
        assert blobs.exists(orphan) and kit.temp_files(setup.root)
    with Hub.open(setup.root, serve=True):
        assert not blobs.exists(orphan) and kit.temp_files(setup.root) == []
        version = kit.db_round(setup.root, 1)[0].current_version
        assert blobs.exists(version)
