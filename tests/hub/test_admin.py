"""The admin's commands beside a running hub: rotating the admin token, closing and extending
the round from the command line; and what the hub directory lets other users see."""

from __future__ import annotations

import os
import stat

import httpx
from typer.testing import CliRunner

from feddiffuse.hub import Hub
from feddiffuse.hub.cli import app
from feddiffuse.shared.protocol import API_PREFIX as A


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_rotate_admin_prints_a_new_token_once_and_the_old_one_stops(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub")
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get(f"{A}/admin/status", headers=setup.auth("admin")).status_code == 200
            res = run("token", "rotate-admin", setup.root)
            assert res.exit_code == 0, res.output
            new = res.stdout.strip()
            assert new.startswith("fdh_") and "\n" not in new and new != setup.admin
            assert "shown once" in res.stderr
            old = http.get(f"{A}/admin/status", headers=setup.auth("admin"))
            assert old.status_code == 401 and old.json()["code"] == "unauthorized"
            fresh = http.get(f"{A}/admin/status", headers={"Authorization": f"Bearer {new}"})
            assert fresh.status_code == 200
    stored = b"".join(p.read_bytes() for p in setup.root.glob("hub.sqlite3*"))
    assert new.encode() not in stored
    assert run("token", "revoke", setup.root, "admin").exit_code == 2  # still refused


def test_the_round_commands_move_a_served_round_on(tmp_path, kit, clock):
    setup = kit.make_hub(tmp_path / "hub", rounds=2, min_clients=2, timeout=60)
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub, tick_interval=0.05) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            version = kit.manifest(http, setup.tokens["alice"]).global_version
            before = hub.store.round(1).deadline
            res = run("round", "extend", setup.root, "120")
            assert res.exit_code == 0, res.output
            assert hub.store.round(1).deadline >= before + 120
            assert run("round", "extend", setup.root, "-5").exit_code == 2
            res = run("round", "close", setup.root)  # nobody reported: keep the global model
            assert res.exit_code == 0, res.output
            kit.wait_until(lambda: kit.manifest(http, setup.tokens["alice"]).round == 2,
                           "the serving hub closes round 1 and opens round 2")
            assert kit.manifest(http, setup.tokens["bob"]).global_version == version
    res = run("round", "close", tmp_path / "nothing")
    assert res.exit_code == 2 and "There is no hub" in res.output


def test_the_hub_directory_is_private(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub")
    with Hub.open(setup.root, serve=True) as hub:
        kit.participate(kit.test_client(hub), "alice", setup.tokens["alice"])
    for d in (setup.root, setup.root / "blobs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [p for p in setup.root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"hub.sqlite3", "serve.lock"}
    assert len(list((setup.root / "blobs").iterdir())) >= 2  # the model and an upload
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    # An existing empty folder is made private too.
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    os.chmod(empty, 0o755)
    kit.make_hub(empty, clients=())
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700
