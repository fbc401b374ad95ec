"""The client trains with the hub's recipe and ends holding the model to sample from: the
hub's EMA of the global model, plus (ulatdec, udec) the EMA of its own personal segments."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from edge_realhub import RealHub
from test_real_hub import InProcessClient, names_of, run_to_the_end

from feddiffuse.edge_client.sampling import current_model
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.recipes import FAST, recipe_from_training
from feddiffuse.shared.wire import load_weights, read_metadata_value, sha256_hex

pytestmark = pytest.mark.slow

EMA = replace(FAST, name="fast-ema", ema_decay=0.5).to_dict()


def test_a_client_ends_with_the_hubs_ema_and_its_own(tmp_path):
    hub = RealHub(tmp_path / "hub", method="ulatdec", rounds=2, recipe=EMA).start_in_thread()
    try:
        clients = [InProcessClient(hub, name, tmp_path) for name in ("alice", "bob")]
        run_to_the_end(clients)
        for c in clients:
            opened = [m for m in c.manifests() if m.phase == "open"]
            assert {recipe_from_training(m.training).name for m in opened} == {"fast-ema"}
            final = [m for m in c.manifests() if m.phase == "finished"][-1]
            assert final.sample_version is not None
            info = c.store.load_info()
            assert info.sample_version == final.sample_version and info.sample_round == 2
            assert sha256_hex(hub_blob(hub, final.sample_version)) == final.sample_version
            ema = c.store.load_sample_model()
            own, meta = load_weights(c.store.personal_ema_path)
            assert read_metadata_value(meta, "round") == "2"
            assert set(own) == names_of(personal_segments("ulatdec"))
            # The personal EMA lags the last personal weights: it is not a copy of them.
            last = c.store.load_personal()
            assert any(not torch.equal(own[n], last[n]) for n in own)
            model, what = current_model(c.store)
            assert "EMA of the global model after round 2" in what
            weights = dict(model.state_dict())
            for n, t in weights.items():
                assert torch.equal(t, own[n] if n in own else ema[n]), n
    finally:
        hub.stop()


def hub_blob(hub: RealHub, sha: str) -> bytes:
    return (hub.root / "blobs" / f"{sha}.safetensors").read_bytes()


def test_samples_from_an_early_model_say_what_to_expect():
    from feddiffuse.edge_client.sampling import maturity_note, rounds_completed
    from feddiffuse.edge_client.state import HubInfo

    assert "initial, untrained model" in maturity_note(0, 8)
    assert "finished 3 of 8 rounds" in maturity_note(3, 8)
    assert maturity_note(8, 8) is None and maturity_note(None, 8) is None
    # The model held at round r's manifest has seen r - 1 rounds; the final one all of them.
    assert rounds_completed(HubInfo(url="u", rounds=8, global_round=4)) == 3
    assert rounds_completed(HubInfo(url="u", rounds=8, global_round=8, finished=True)) == 8
    assert rounds_completed(HubInfo(url="u", rounds=8, global_round=8, finished=True,
                                    sample_version="ab", sample_round=8)) == 8
    assert rounds_completed(HubInfo(url="u")) is None
