"""The `feddiffuse-hub` admin commands: init, token, status, export, serve's checks."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from feddiffuse.hub import Hub
from feddiffuse.hub.cli import app
from feddiffuse.shared.protocol import HubStatus
from feddiffuse.shared.wire import load_model, sha256_hex

INIT = ["--preset", "tiny", "--method", "usplit", "--rounds", "2", "--local-epochs", "1"]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_init_creates_a_hub_and_shows_the_admin_token_once(tmp_path):
    root = tmp_path / "hub"
    res = run("init", root, *INIT, "--min-clients", "2", "--round-timeout", "600",
              "--seed", "7", "--name", "demo")
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    assert token.startswith("fdh_") and "\n" not in token
    assert "Admin token" in res.stderr
    assert sorted(p.name for p in root.iterdir()) == ["blobs", "hub.sqlite3"]
    (blob,) = (root / "blobs").iterdir()
    assert blob.name == f"{sha256_hex(blob.read_bytes())}.safetensors"
    db = sqlite3.connect(root / "hub.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute("SELECT name, min_clients, round_timeout_s, seed FROM federation").fetchone()
    assert row == ("demo", 2, 600.0, 7)
    db.close()
    stored = b"".join(p.read_bytes() for p in root.glob("hub.sqlite3*"))
    assert token.encode() not in stored  # only its sha256 is kept
    assert sha256_hex(token.encode()).encode() in stored


def test_token_create_list_revoke(tmp_path):
    root = tmp_path / "hub"
    assert run("init", root, *INIT).exit_code == 0
    res = run("token", "create", root, "alice")
    assert res.exit_code == 0 and res.stdout.strip().startswith("fdh_")
    assert run("token", "create", root, "bob").exit_code == 0
    listing = run("token", "list", root)
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:]] == [
        "admin", "alice", "bob"]
    assert run("token", "revoke", root, "bob").exit_code == 0
    rows = {r["name"]: r for r in json.loads(run("token", "list", root, "--json").stdout)}
    assert rows["bob"]["revoked_at"] is not None and rows["alice"]["revoked_at"] is None
    with Hub.open(root) as hub:
        assert hub.store.enrolled_clients() == ["alice"]


def test_status_and_export_after_a_round(tmp_path, kit):
    from dataclasses import replace

    from feddiffuse.shared.recipes import FAST

    setup = kit.make_hub(tmp_path / "hub", method="usplit", rounds=2, min_clients=2,
                         timeout=600, recipe=replace(FAST, ema_decay=0.5).to_dict())
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        for c, t in setup.tokens.items():
            kit.participate(http, c, t)
        kit.participate(http, "alice", setup.tokens["alice"])
    res = run("status", setup.root)
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "Federation 'test'" in text and "round 2 of 2" in text
    assert "reported:  1/3: alice" in text and "missing:   bob, carol" in text
    assert "deadline:" in text and "History:" in text
    history_row = text.splitlines()[-1].split()
    assert history_row[:3] == ["1", "3", "3"]  # round, participants, reported
    report = HubStatus.model_validate_json(run("status", setup.root, "--json").stdout)
    assert report.current.round == 2 and report.history[0].bytes_in > 0
    assert report.history[0].bytes_out > 0 and report.history[0].mean_loss == 0.25
    out = tmp_path / "global.safetensors"
    res = run("export", setup.root, out, "--model", "global")
    assert res.exit_code == 0, res.output
    assert sha256_hex(out.read_bytes()) == report.current.global_version
    model, meta = load_model(out)
    assert meta["feddiffuse.preset"] == "tiny" and meta["feddiffuse.round"] == "2"
    # By default the model to sample from: the recipe's EMA of the global model, which
    # after one round is the first aggregate itself (the EMA starts there).
    ema_out = tmp_path / "sample.safetensors"
    res = run("export", setup.root, ema_out)
    assert res.exit_code == 0 and "EMA of the global model" in res.output, res.output
    with Hub.open(setup.root) as hub:
        assert sha256_hex(ema_out.read_bytes()) == hub.store.federation().sample_version
    ema, meta = load_model(ema_out)
    assert meta["feddiffuse.kind"] == "global-ema"
    for a, b in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        assert a.equal(b)
    assert run("export", setup.root, ema_out, "--model", "nope").exit_code == 2


@pytest.mark.parametrize("args", [
    ["init", "{hub}", *INIT[:1], "nope", *INIT[2:]],
    ["init", "{hub}", "--preset", "tiny", "--method", "fedprox", *INIT[4:]],
    ["init", "{hub}", *INIT[:5], "0", *INIT[6:]],
    ["init", "{hub}", *INIT, "--min-clients", "0"],
    ["init", "{hub}", *INIT, "--round-timeout", "-5"],
    ["init", "{hub}", *INIT, "--name", "!!"],
    ["init", "{tmp}/missing/hub", *INIT],
    ["status", "{hub}"],
    ["token", "create", "{hub}", "alice"],
    ["token", "list", "{hub}"],
    ["export", "{hub}", "{tmp}/out.safetensors"],
    ["serve", "{hub}"],
])
def test_user_mistakes_exit_2_with_one_sentence_and_write_nothing(tmp_path, args):
    hub = tmp_path / "hub"
    res = run(*[a.format(hub=hub, tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == []


def test_mistakes_on_an_existing_hub(tmp_path):
    root = tmp_path / "hub"
    assert run("init", root, *INIT).exit_code == 0
    before = sorted(p.name for p in (root / "blobs").iterdir())
    for args in (["init", root, *INIT],
                 ["token", "create", root, "admin"],
                 ["token", "create", root, "bad name"],
                 ["token", "revoke", root, "ghost"],
                 ["token", "revoke", root, "admin"],
                 ["export", root, tmp_path / "nowhere" / "x.safetensors"],
                 ["export", root, tmp_path],
                 ["serve", root, "--tls-cert", tmp_path / "cert.pem"],
                 ["serve", root, "--port", "0"]):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("error: "), args
    assert run("token", "create", root, "alice").exit_code == 0
    res = run("token", "create", root, "alice")
    assert res.exit_code == 2 and "exists already" in res.stderr
    assert sorted(p.name for p in (root / "blobs").iterdir()) == before
    with Hub.open(root, serve=True):  # a second server on the same directory is refused
        res = run("serve", root)
        assert res.exit_code == 2 and "Another hub process" in res.stderr


DP = ["--dp", "central", "--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-delta", "1e-5"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--dp", "central", "--dp-clip", "-1", "--dp-noise-multiplier", "1", "--dp-delta", "1e-5"],
     "--dp-clip must be a positive number."),
    (["--dp", "central", "--dp-clip", "1", "--dp-delta", "1e-5"],
     "--dp central needs --dp-noise-multiplier Z"),
    ([*DP, "--dp-epsilon-budget", "1"], "does not allow a single round"),
    (["--dp-clip", "1"], "--dp-clip need --dp central or --dp local."),
])
def test_init_refuses_bad_dp_options_in_one_line_and_writes_nothing(tmp_path, extra, message):
    root = tmp_path / "hub"
    res = run("init", root, *INIT, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output and not root.exists()


def test_init_with_dp_keeps_the_settings_and_status_shows_the_budget(tmp_path):
    root = tmp_path / "hub"
    res = run("init", root, *INIT, *DP, "--dp-epsilon-budget", "8")
    assert res.exit_code == 0, res.output
    assert "the budget allows" not in res.stderr  # both rounds fit
    assert "central DP: clip 1, noise multiplier 1" in res.stderr
    with Hub.open(root) as hub:
        privacy = hub.settings.privacy_settings
        status = hub.status()
    assert privacy is not None and privacy.epsilon_budget == 8 and privacy.mode == "central"
    assert status.federation.privacy is not None
    assert status.federation.privacy.epsilon == 0 and status.federation.privacy.history == []
    text = run("status", root).stdout
    assert "epsilon spent: 0 of 8 after 0 released round(s)" in text
    # Three rounds do not all fit: init says so (and the hub will stop opening rounds).
    res = run("init", tmp_path / "hub3", "--preset", "tiny", "--method", "full", "--rounds",
              "3", "--local-epochs", "1", *DP, "--dp-epsilon-budget", "8")
    assert res.exit_code == 0 and "the budget allows 2 of the 3 rounds" in res.stderr
