"""The hub's training recipe: carried in every manifest, its EMA of the global model published
beside each aggregate (downloadable, exported, redone to the same bytes), its server step,
and hubs made before recipes existed."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
import torch

from feddiffuse.hub import Hub
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.recipes import FAST, PAPER, recipe_from_training, update_ema
from feddiffuse.shared.wire import decode_tensors, sha256_hex

from .conftest import bearer

EMA_RECIPE = replace(FAST, name="fast-ema", ema_decay=0.5, server_lr=1.5).to_dict()


def test_the_manifest_carries_the_recipe_and_the_ema_follows_the_globals(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="usplit", rounds=3, seed=3,
                         recipe=EMA_RECIPE)
    globals_, samples = [], []
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        for r in (1, 2, 3):
            m = kit.manifest(http, setup.tokens["alice"])
            recipe = recipe_from_training(m.training)
            assert recipe == replace(FAST, name="fast-ema", ema_decay=0.5, server_lr=1.5,
                                     batch_size=recipe.batch_size)
            assert recipe.batch_size == FAST.batch_size
            assert m.sample_version == (samples[-1] if samples else None)
            for c, t in setup.tokens.items():
                kit.participate(http, c, t)
            fed, row, _ = kit.db_round(setup.root, r)
            globals_.append(kit.blob_state(setup.root, row.result_version))
            samples.append(fed.sample_version)
        final = kit.manifest(http, setup.tokens["bob"])
        assert final.phase == "finished" and final.sample_version == samples[-1]
        # The EMA starts at the first aggregate and then moves by (1 - 0.5) each round.
        ema = None
        for g, sha in zip(globals_, samples, strict=True):
            ema = update_ema(ema, g, 0.5)
            got = kit.blob_state(setup.root, sha)
            assert set(got) == set(ema) and all(torch.equal(got[n], ema[n]) for n in ema)
        assert len(set(samples)) == 3
        # A client downloads it like any global version, checked against its name.
        resp = http.get(f"{A}/models/{samples[-1]}", headers=bearer(setup.tokens["carol"]))
        assert resp.status_code == 200 and sha256_hex(resp.content) == samples[-1]
        tensors, meta = decode_tensors(resp.content)
        assert meta["feddiffuse.kind"] == "global-ema"
        out = tmp_path / "sample.safetensors"
        assert hub.export(out)[0] == samples[-1]
        assert hub.export(out, "global")[0] == fed.current_version


def test_the_server_step_scales_the_mean_update(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=1, seed=3,
                         recipe=EMA_RECIPE)
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        fed, _, _ = kit.db_round(setup.root, 1)
        base = kit.blob_state(setup.root, fed.current_version)
        sent = {c: kit.participate(http, c, t) for c, t in setup.tokens.items()}
        fed, row, _ = kit.db_round(setup.root, 1)
        got = kit.blob_state(setup.root, row.result_version)
    plain = kit.reference(base, "full", 1, 3, sorted(setup.tokens), sent)
    for n in base:
        assert torch.allclose(got[n] - base[n], 1.5 * (plain[n] - base[n]), atol=1e-6)


def test_a_paper_hub_has_no_ema_and_says_paper(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=1, recipe="paper")
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        m = kit.manifest(http, setup.tokens["alice"])
        assert recipe_from_training(m.training) == replace(PAPER, batch_size=128)
        for c, t in setup.tokens.items():
            kit.participate(http, c, t)
        fed, _, _ = kit.db_round(setup.root, 1)
        assert fed.sample_version is None
        assert kit.manifest(http, setup.tokens["alice"]).sample_version is None
        out = tmp_path / "final.safetensors"
        assert hub.export(out)[0] == fed.current_version


def test_a_hub_made_before_recipes_opens_with_the_papers(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=1, recipe="paper")
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    _back_to_schema_2(db)
    db.execute("UPDATE federation SET lr = 0.0005, batch_size = 16")
    db.execute("ALTER TABLE federation DROP COLUMN recipe")
    db.execute("ALTER TABLE federation DROP COLUMN sample_version")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Hub.open(setup.root) as hub:
        recipe = hub.settings.training_recipe
        assert recipe == replace(PAPER, lr=0.0005, batch_size=16)
        assert hub.store.federation().sample_version is None
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    assert db.execute("SELECT value FROM meta").fetchone() == ("4",)
    db.close()


def _back_to_schema_3(db: sqlite3.Connection) -> None:
    """Undo schema 4: no codecs, no privacy settings."""
    db.execute("ALTER TABLE federation DROP COLUMN uplink_codec")
    db.execute("ALTER TABLE federation DROP COLUMN downlink_codec")
    db.execute("ALTER TABLE federation DROP COLUMN privacy")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def _back_to_schema_2(db: sqlite3.Connection) -> None:
    """Undo schemas 4 and 3: no codecs, no removed participants, one row per download."""
    _back_to_schema_3(db)
    db.execute("ALTER TABLE participants DROP COLUMN removed_at")
    db.execute("ALTER TABLE participants DROP COLUMN removed_reason")
    db.execute("DROP TABLE download_totals")
    db.execute("CREATE TABLE downloads (id INTEGER PRIMARY KEY, round INTEGER NOT NULL, "
               "client TEXT NOT NULL, version TEXT NOT NULL, segments TEXT NOT NULL, "
               "bytes INTEGER NOT NULL, at REAL NOT NULL)")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def test_a_schema_2_hub_keeps_its_participants_and_download_totals(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=2)
    with Hub.open(setup.root, serve=True) as hub:
        kit.manifest(kit.test_client(hub), setup.tokens["alice"])  # round 1 opens
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    _back_to_schema_2(db)
    db.executemany("INSERT INTO downloads (round, client, version, segments, bytes, at) "
                   "VALUES (?, ?, 'v', 'encoder', ?, 0)", [(1, "alice", 100), (1, "alice", 50),
                                                            (1, "bob", 7)])
    db.commit()
    db.close()
    with Hub.open(setup.root) as hub:
        assert hub.store.bytes_out() == {1: 157}
        assert [p.client for p in hub.store.participants(1)] == ["alice", "bob", "carol"]
        assert not any(p.removed for p in hub.store.participants(1))
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    assert db.execute("SELECT value FROM meta").fetchone() == ("4",)
    assert db.execute("SELECT client, requests, bytes FROM download_totals ORDER BY client"
                      ).fetchall() == [("alice", 2, 150), ("bob", 1, 7)]
    db.close()


@pytest.mark.parametrize("bad", ["fastest", {"name": "x", "optimizer": "sgd"}])
def test_an_unknown_recipe_is_refused_at_init(tmp_path, kit, bad):
    from feddiffuse.shared.errors import UserError

    with pytest.raises(UserError):
        kit.make_hub(tmp_path / "hub", recipe=bad)
    assert not (tmp_path / "hub" / "hub.sqlite3").exists()


def test_a_schema_3_hub_sends_fp32_both_ways(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=1)
    db = sqlite3.connect(setup.root / "hub.sqlite3")
    _back_to_schema_3(db)
    db.commit()
    db.close()
    with Hub.open(setup.root) as hub:
        assert (hub.settings.uplink_codec, hub.settings.downlink_codec) == ("fp32", "fp32")
