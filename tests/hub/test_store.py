"""The blob folder and the SQLite store: atomic files, content addresses, one-step changes."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from feddiffuse.hub import Hub
from feddiffuse.hub.blobs import BlobStore
from feddiffuse.hub.errors import UserError
from feddiffuse.hub.store import CLOSING, OPEN, open_store
from feddiffuse.hub.store.base import NewEvent, ParticipantRow, RoundRow, UploadRow


def test_blobs_are_content_addressed_and_written_whole(tmp_path):
    blobs = BlobStore(tmp_path)
    sha = blobs.write_bytes(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert blobs.read_bytes(sha) == b"hello" and blobs.hash_file(sha) == sha
    assert blobs.write_bytes(b"hello") == sha
    assert [p.name for p in tmp_path.iterdir()] == [f"{sha}.safetensors"]
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_a_temporary_is_invisible_until_committed_and_cleaned_after_a_crash(tmp_path):
    blobs = BlobStore(tmp_path)
    temp = blobs.temp()
    temp.write(b"half of an upl")
    assert list(tmp_path.glob("*.safetensors")) == []  # a reader sees no blob
    other = blobs.temp()
    other.write(b"whole")
    blobs.commit(other, hashlib.sha256(b"whole").hexdigest())
    assert blobs.remove_temporaries() == 1  # what the crashed writer left
    assert [p.name for p in tmp_path.iterdir()] == [
        f"{hashlib.sha256(b'whole').hexdigest()}.safetensors"]


def test_garbage_collection_keeps_what_is_referenced(tmp_path):
    blobs = BlobStore(tmp_path)
    keep, drop = blobs.write_bytes(b"keep"), blobs.write_bytes(b"drop")
    (tmp_path / "notes.txt").write_text("not a blob")
    assert blobs.collect_garbage({keep}) == 1
    assert blobs.exists(keep) and not blobs.exists(drop)
    assert (tmp_path / "notes.txt").exists()


def test_the_store_is_wal_and_changes_in_single_steps(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice",))
    store = open_store(setup.root / "hub.sqlite3")
    try:
        db = sqlite3.connect(setup.root / "hub.sqlite3")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
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
        with pytest.raises(KeyError):
            store.add_token("alice", "client", "cd" * 32, 4.0)
    finally:
        store.close()


def test_opening_a_folder_without_a_hub_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no hub"):
        Hub.open(tmp_path)


def test_start_removes_what_a_crash_left_behind(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub")
    blobs = BlobStore(setup.root / "blobs")
    temp = blobs.temp()
    temp.write(b"partial")
    orphan = blobs.write_bytes(b"written but never recorded")
    with Hub.open(setup.root):  # not serving: leaves things alone
        assert blobs.exists(orphan) and kit.temp_files(setup.root)
    with Hub.open(setup.root, serve=True):
        assert not blobs.exists(orphan) and kit.temp_files(setup.root) == []
        version = kit.db_round(setup.root, 1)[0].current_version
        assert blobs.exists(version)
