"""A hub in PostgreSQL and an S3 bucket: `init --store --blobs`, `serve` on them, `migrate`
from SQLite, and what an admin's mistake gets (one sentence, nothing written). Real servers:
the session's PostgreSQL and SeaweedFS (tests/support/services.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support.net import free_port, wait_healthy
from support.services import PG_PASSWORD, S3_SECRET_KEY
from typer.testing import CliRunner

from feddiffuse.hub import Hub
from feddiffuse.hub.backends import Backends, open_hub_store
from feddiffuse.hub.cli import app
from feddiffuse.hub.s3blobs import S3BlobStore
from feddiffuse.shared.protocol import API_PREFIX as A

INIT = ["--preset", "tiny", "--method", "usplit", "--rounds", "2", "--local-epochs", "1"]
BIN = Path(sys.executable).parent


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_sentence(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_an_unreachable_store_at_init_is_one_sentence_and_writes_nothing(tmp_path, s3_server,
                                                                         s3_bucket):
    root = tmp_path / "hub"
    res = run("init", root, *INIT, "--store", f"postgresql://hub@127.0.0.1:{free_port()}/hub",
              "--blobs", f"s3://{s3_bucket}/x", "--s3-endpoint", s3_server.endpoint)
    assert "Cannot use the PostgreSQL database" in one_sentence(res)
    assert not root.exists() and s3_server.keys(s3_bucket) == []


def test_a_missing_bucket_at_init_is_one_sentence(tmp_path, pg_url, s3_server, s3_bucket):
    res = run("init", tmp_path / "hub", *INIT, "--store", pg_url, "--blobs",
              "s3://no-such-bucket-here/x", "--s3-endpoint", s3_server.endpoint)
    assert "Cannot use the bucket" in one_sentence(res)
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("args, says", [
    (["--store", "postgresql://hub:secret@127.0.0.1:5432/hub"], "Leave the password out"),
    (["--store", "mysql://hub@127.0.0.1/hub"], "postgresql://"),
    (["--store", "postgresql://hub@127.0.0.1:5432/"], "names no database"),
    (["--blobs", "s3://ab/x"], "bucket name of 3 to 63"),
    (["--blobs", "/var/blobs"], "s3://BUCKET/PREFIX"),
    (["--s3-endpoint", "http://127.0.0.1:1"], "needs --blobs"),
])
def test_malformed_backends_are_refused_before_anything(tmp_path, args, says):
    res = run("init", tmp_path / "hub", *INIT, *args)
    assert says in one_sentence(res)
    assert not (tmp_path / "hub").exists()


def test_init_on_postgresql_and_s3_names_them_in_hub_json_without_a_secret(
        tmp_path, pg_url, s3_server, s3_bucket):
    root = tmp_path / "hub"
    blobs = f"s3://{s3_bucket}/fed"
    res = run("init", root, *INIT, "--store", pg_url, "--blobs", blobs, "--s3-endpoint",
              s3_server.endpoint)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in root.iterdir()) == ["hub.json"]
    config = json.loads((root / "hub.json").read_text())
    assert config == {"format": 1, "store": pg_url, "blobs": blobs,
                      "s3_endpoint": s3_server.endpoint}
    assert (root / "hub.json").stat().st_mode & 0o077 == 0
    (key,) = s3_server.keys(s3_bucket)
    assert re.fullmatch(r"fed/[0-9a-f]{64}\.safetensors", key)
    assert run("token", "create", root, "alice").exit_code == 0
    with Hub.open(root) as hub:
        assert hub.store.enrolled_clients() == ["alice"]
        assert hub.store.federation().current_version == key[4:68]
    res = run("init", tmp_path / "again", *INIT, "--store", pg_url)
    assert "holds a hub already" in one_sentence(res)


def test_serve_reads_the_secrets_from_the_environment_and_never_writes_them(
        tmp_path, pg_url, s3_server, s3_bucket, postgres_server):
    """PGPASSWORD and AWS_SECRET_ACCESS_KEY are used (the servers demand them) but appear in
    no log line, no config file and no command line."""
    root = tmp_path / "hub"
    env = {"PATH": str(BIN), **postgres_server.env, **s3_server.env,
           "HOME": str(tmp_path)}
    init = subprocess.run([str(BIN / "feddiffuse-hub"), "init", str(root), *INIT, "--store",
                           pg_url, "--blobs", f"s3://{s3_bucket}/fed", "--s3-endpoint",
                           s3_server.endpoint], capture_output=True, text=True, env=env,
                          timeout=120)
    assert init.returncode == 0, init.stderr
    admin = init.stdout.strip()
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [str(BIN / "feddiffuse-hub"), "serve", "--store", pg_url, "--blobs",
           f"s3://{s3_bucket}/fed", "--s3-endpoint", s3_server.endpoint, "--port", str(port),
           "--log-level", "debug"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}{A}/health", proc=proc, log=log)
        r = httpx.get(f"{url}{A}/admin/status", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text
        assert r.json()["federation"]["name"] == "hub"
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text() + init.stderr + init.stdout + (root / "hub.json").read_text()
    assert "replica" in text  # it did serve as a replica
    for secret in (PG_PASSWORD, S3_SECRET_KEY):
        assert secret not in text and secret not in " ".join(cmd)
    without = subprocess.run([str(BIN / "feddiffuse-hub"), "status", str(root)],
                             capture_output=True, text=True, timeout=60,
                             env={"PATH": str(BIN), "HOME": str(tmp_path)})
    assert without.returncode == 2 and "Traceback" not in without.stderr
    assert "password" in without.stderr.lower() or "PGPASSWORD" in without.stderr


def test_migrate_moves_an_embedded_hub_without_losing_an_upload(tmp_path, kit, pg_url,
                                                                s3_server, s3_bucket):
    setup = kit.make_hub(tmp_path / "hub", method="usplit", rounds=2, seed=2)
    with Hub.open(setup.root, serve=True) as hub, kit.test_client(hub) as http:
        for c, t in setup.tokens.items():
            kit.participate(http, c, t)  # round 1 closes and round 2 opens
        kit.participate(http, "alice", setup.tokens["alice"])  # one upload of round 2
        before = hub.status()
        uploads = {r: hub.store.uploads(r) for r in (1, 2)}
        blobs = hub.store.referenced_blobs()
    res = run("migrate", setup.root, "--store", pg_url, "--blobs", f"s3://{s3_bucket}/m",
              "--s3-endpoint", s3_server.endpoint)
    assert res.exit_code == 0, res.output
    assert "upload(s)" in res.stdout
    assert sorted(p.name for p in setup.root.iterdir()) == [
        "blobs", "hub.json", "hub.sqlite3.migrated", "serve.lock"]
    assert Backends.of(kit_paths(setup.root)).store == pg_url
    with Hub.open(setup.root, serve=True) as hub, kit.test_client(hub) as http:
        assert {r: hub.store.uploads(r) for r in (1, 2)} == uploads
        assert hub.store.referenced_blobs() == blobs
        assert isinstance(hub.blobs, S3BlobStore)
        for sha in blobs:
            assert hub.blobs.hash_file(sha) == sha
        after = hub.status()
        assert after.federation == before.federation
        assert [h.model_dump() for h in after.history] == [h.model_dump()
                                                           for h in before.history]
        for c in ("bob", "carol"):  # the round goes on where it was
            kit.participate(http, c, setup.tokens[c])
        assert hub.store.federation().finished
    store = open_hub_store(setup.root)
    try:
        assert len(store.uploads(2)) == 3
    finally:
        store.close()
    res = run("migrate", setup.root, "--store", pg_url)
    assert "not an embedded hub" in one_sentence(res)


def kit_paths(root: Path):
    from feddiffuse.hub.paths import HubPaths

    return HubPaths(root)


def test_migrate_into_a_database_that_holds_a_hub_changes_nothing(tmp_path, kit, pg_url):
    other = kit.make_hub(tmp_path / "other", backends=Backends(store=pg_url))
    assert other.root.joinpath("hub.json").is_file()
    setup = kit.make_hub(tmp_path / "hub")
    res = run("migrate", setup.root, "--store", pg_url)
    assert "holds a hub already" in one_sentence(res)
    assert sorted(p.name for p in setup.root.iterdir()) == ["blobs", "hub.sqlite3",
                                                             "serve.lock"]


def test_one_replica_runs_the_rounds_and_another_takes_over_when_it_stops(tmp_path, kit,
                                                                          pg_url):
    """Two serving hubs on one database: the first holds the lease and runs the rounds; the
    second takes uploads and admin requests, wakes its long polls when the first moves the
    federation on, and takes the lease when the first stops."""
    import threading

    from support.wait import poll_until

    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"), rounds=2,
                         backends=Backends(store=pg_url))
    a = Hub.open(setup.root, serve=True)
    b = Hub.open(setup.root, serve=True)
    try:
        assert a._runs_lifecycle() and not b._runs_lifecycle()
        http = kit.test_client(b)
        kit.participate(http, "alice", setup.tokens["alice"])
        assert not b.due()  # b never moves the rounds on
        woke = threading.Event()
        b.add_listener(woke.set)
        b.housekeeping()  # its first look at the federation
        r = http.post(f"{A}/admin/rounds/current/close", headers=setup.auth("admin"))
        assert r.status_code == 200, r.text
        assert b.store.round(1).status == "closing"  # recorded; the holder aggregates
        a.tick()  # the holder aggregates and publishes, and opens round 2
        assert a.store.round(1).status == "closed" and a.store.round(2) is not None
        b.housekeeping()
        assert woke.is_set()
        a.close()  # the holder stops: its lease is free
        poll_until(lambda: (b.tick(), b._runs_lifecycle())[1], "b takes the lease", 30)
        for c in ("alice", "bob"):
            kit.participate(http, c, setup.tokens[c])
        poll_until(lambda: b.store.federation().finished, "b finishes round 2", 30)
    finally:
        b.close()
        a.close()
