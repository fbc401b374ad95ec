"""Against a real uvicorn server on loopback: an admin can always move a federation on, and a
revoked token is refused until the very moment its upload would be recorded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from typer.testing import CliRunner

from feddiffuse.hub import Hub
from feddiffuse.hub.cli import app as cli
from feddiffuse.hub.store import open_store
from feddiffuse.hub.testhooks import on
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import HubStatus
from feddiffuse.shared.wire import sha256_hex


def status(http, setup) -> HubStatus:
    r = http.get(f"{A}/admin/status", headers=setup.auth("admin"))
    assert r.status_code == 200, r.text
    return HubStatus.model_validate_json(r.content)


def revoke_from_the_cli(root, name: str) -> None:
    """As an admin does beside a running `serve`: only the database changes."""
    res = CliRunner().invoke(cli, ["token", "revoke", str(root), name])
    assert res.exit_code == 0, res.output


def phase(kit, http, token: str) -> str:
    return kit.manifest(http, token).phase


def test_a_round_whose_participants_are_all_revoked_restarts_with_the_enrolled(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", rounds=2, min_clients=2, clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub, tick_interval=0.05) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            first = kit.manifest(http, setup.tokens["alice"])
            assert first.phase == "open" and first.round == 1
            zoe = kit.enrol(setup.root, "zoe")  # after round 1 opened: not a participant
            assert phase(kit, http, zoe) == "waiting"
            for c in ("alice", "bob"):
                revoke_from_the_cli(setup.root, c)
            # Nobody can report and only zoe is enrolled, below the quorum of 2: the status
            # says so, and what the admin can do.
            note = kit.wait_until(lambda: (n := status(http, setup).note) and
                                  "no participant left" in n and n, "the status names the stall")
            assert "token create" in note and "close" in note
            yan = kit.enrol(setup.root, "yan")
            kit.wait_until(lambda: phase(kit, http, zoe) == "open",
                           "round 1 restarts with zoe and yan")
            again = kit.manifest(http, zoe)
            assert again.round == 1 and again.global_version == first.global_version
            st = status(http, setup)
            assert st.current.round == 1
            assert set(st.current.participants) == {"alice", "bob", "yan", "zoe"}
            kit.participate(http, "zoe", zoe)
            kit.participate(http, "yan", yan)
            kit.wait_until(lambda: kit.db_round(setup.root, 1)[1].status == "closed",
                           "round 1 closes once zoe and yan reported")
            _, row, uploads = kit.db_round(setup.root, 1)
            assert sorted(u.client for u in uploads) == ["yan", "zoe"]
            assert row.close_reason.startswith("every remaining participant reported (2 of 4")
            assert kit.manifest(http, zoe).round == 2
            events = {e.kind for e in hub.store.events()}
            assert {"removed", "restarted"} <= events


def test_revocation_below_the_quorum_is_said_and_never_called_everyone(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", rounds=2, min_clients=2)
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub, tick_interval=0.05) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            kit.participate(http, "alice", setup.tokens["alice"])
            hub.revoke_token("bob")
            revoke_from_the_cli(setup.root, "carol")
            note = kit.wait_until(lambda: (n := status(http, setup).note) and
                                  "can no longer reach its quorum of 2" in n and n,
                                  "the status says the quorum cannot be met")
            assert "close" in note and "bob" in note and "carol" in note
            # The round does not close by itself below its quorum...
            _, row, _ = kit.db_round(setup.root, 1)
            assert row.status == "open"
            assert any(e.kind == "quorum-lost" for e in hub.store.events())
            # ...the admin closes it with what it has.
            r = http.post(f"{A}/admin/rounds/current/close", headers=setup.auth("admin"))
            assert r.status_code == 200, r.text
            _, row, uploads = kit.db_round(setup.root, 1)
            assert row.status == "closed" and [u.client for u in uploads] == ["alice"]
            assert row.close_reason == "closed by the admin"
            summary = HubStatus.model_validate_json(r.content).history[0]
            assert summary.missing == ["bob", "carol"] and summary.reported == ["alice"]


def test_revocation_with_the_quorum_left_closes_as_every_remaining(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", rounds=1, min_clients=1)
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub, tick_interval=0.05) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            kit.participate(http, "alice", setup.tokens["alice"])
            hub.revoke_token("bob")
            hub.revoke_token("carol")
            kit.wait_until(lambda: kit.db_round(setup.root, 1)[1].status == "closed",
                           "the round closes with alice's report")
            _, row, _ = kit.db_round(setup.root, 1)
            assert row.close_reason == ("every remaining participant reported (1 of 3; 2 "
                                        "removed: token revoked)")


def _held_body(body: bytes, release: threading.Event):
    """The first half at once, the rest when `release` is set (a slow upload, no sleep)."""
    half = len(body) // 2
    yield body[:half]
    assert release.wait(60), "the test never released the upload"
    for i in range(half, len(body), 1 << 16):
        yield body[i:i + (1 << 16)]


def test_a_token_revoked_while_its_upload_streams_is_refused_at_commit(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            sent = kit.participate(http, "bob", setup.tokens["bob"], upload=False)
            release = threading.Event()
            slots = server.app.state.upload_slots
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(http.put, f"{A}/rounds/1/update",
                                     content=_held_body(sent.body, release),
                                     headers=setup.auth("bob"))
                # The hub has taken the token and is reading the body.
                kit.wait_until(lambda: slots.in_progress == 1 or answer.done(),
                               "bob's upload is in progress")
                assert not answer.done(), answer.result().text
                hub.revoke_token("bob")
                release.set()
                r = answer.result()
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert "revoked" in r.json()["message"]
        assert hub.store.uploads(1) == []
        assert not (setup.root / "blobs" / f"{sha256_hex(sent.body)}.safetensors").exists()
        assert kit.temp_files(setup.root) == []


def test_a_token_revoked_between_the_body_and_the_commit_is_refused(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            sent = kit.participate(http, "bob", setup.tokens["bob"], upload=False)
            reached, go = threading.Event(), threading.Event()

            def hold() -> None:  # in the hub's thread: the body is in, nothing recorded
                reached.set()
                assert go.wait(60), "the test never let the commit go on"

            with on("upload-commit", hold), ThreadPoolExecutor(1) as pool:
                answer = pool.submit(http.put, f"{A}/rounds/1/update", content=sent.body,
                                     headers=setup.auth("bob"))
                assert reached.wait(60), answer.result().text if answer.done() else "stuck"
                store = open_store(setup.root / "hub.sqlite3")  # another process's view
                try:
                    assert store.revoke_token("bob", 0.0)
                finally:
                    store.close()
                go.set()
                r = answer.result()
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert hub.store.uploads(1) == []
        assert not (setup.root / "blobs" / f"{sha256_hex(sent.body)}.safetensors").exists()
