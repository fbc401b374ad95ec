"""Differential privacy in real federations on loopback (a hub and two client processes):
central DP reports the accountant's epsilon after every round and opens no round past its
budget; under local DP what the hub stores is clipped and noised as declared.

Tiny preset, 16 Fashion-MNIST images per client, batch 16: one step per local epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from dp_accounting import dp_event, rdp
from federation_fixtures import Federation, partition, run_cli, upload_metadata
from safetensors.torch import load_file
from scipy.stats import chi2

from feddiffuse.hub.paths import HubPaths
from feddiffuse.hub.store import open_store
from feddiffuse.shared.protocol import API_PREFIX, Manifest

pytestmark = [pytest.mark.slow, pytest.mark.requires_fmnist]

ALPHA = 1e-6  # false-alarm rate of the chi-square check, per upload
DELTA = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory, fmnist_required_module) -> Path:
    return partition(tmp_path_factory.mktemp("fmnist") / "clients", clients=2, limit=32, seed=1)


def accountant_epsilon(z: float, rounds: int) -> float:
    """Computed here, independently of the hub: dp-accounting's RDP accountant, one Gaussian
    mechanism of multiplier z per round, every client in every round."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(DELTA)


def test_central_dp_epsilon_after_every_round_and_no_round_past_the_budget(tmp_path, data):
    z, budget = 1.0, 8.0
    assert accountant_epsilon(z, 2) <= budget < accountant_epsilon(z, 3)  # 2 of 3 rounds fit
    fed = Federation(tmp_path, data, method="full", rounds=3, init_args=[
        "--dp", "central", "--dp-clip", "0.5", "--dp-noise-multiplier", str(z),
        "--dp-delta", str(DELTA), "--dp-epsilon-budget", str(budget)])
    try:
        fed.start_hub()
        for c in fed.clients:
            fed.start_client(c)
        status = fed.wait_for(
            lambda s: s.federation.privacy is not None
            and s.federation.privacy.rounds_released == 2 and s.federation.finished,
            what="two released rounds, then the federation ended by its budget")
        privacy = status.federation.privacy
        assert privacy is not None
        assert [h.round for h in privacy.history] == [1, 2]
        for h in privacy.history:
            assert h.epsilon == pytest.approx(accountant_epsilon(z, h.round), rel=1e-9)
        assert privacy.epsilon == pytest.approx(accountant_epsilon(z, 2), rel=1e-9)
        assert privacy.epsilon_budget == budget
        assert status.current is None and status.federation.current_round == 2
        assert status.note is not None and "finished after 2 round(s) of 3 planned" in status.note
        assert "privacy budget" in status.note
        # The client sees the same figures in its manifest, and the federation's end.
        r = httpx.get(f"{fed.url}{API_PREFIX}/manifest", timeout=10,
                      headers={"Authorization": f"Bearer {fed.tokens['client-00']}"})
        manifest = Manifest.model_validate_json(r.content)
        assert manifest.phase == "finished" and manifest.round == 2
        assert manifest.privacy == privacy
        # Each round's record says who added the noise and where it came from.
        store = open_store(HubPaths(fed.root).db)
        try:
            events = store.events()
        finally:
            store.close()
        closed = [e.message for e in events if e.kind == "closed"]
        assert len(closed) == 2
        assert all("the hub added Gaussian noise of std 0.5" in m and "noise: os-random" in m
                   for m in closed)
        assert [e.round for e in events if e.kind == "budget"] == [3]
        finished = [e for e in events if e.kind == "finished"]
        assert len(finished) == 1 and finished[0].round == 2
        assert "of 3 planned: the privacy budget allows no more" in finished[0].message
        text = run_cli("feddiffuse-hub", "status", str(fed.root))
        assert f"epsilon spent: {accountant_epsilon(z, 2):.4g} of 8" in text
        # The clients end, holding the final model, instead of waiting for a round that
        # cannot open.
        fed.wait_clients()
        for c in fed.clients:
            assert "finished after 2 rounds" in fed.client_log(c).read_text()
        # Clipped, not noised, by the clients: the hub's store holds the raw clipped deltas.
        for u in fed.uploads():
            tensors = load_file(fed.blob(u.sha256))
            norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
            assert norm <= 0.5 * (1 + 1e-5)
    finally:
        fed.stop()


def test_local_dp_uploads_hold_clipped_deltas_plus_the_declared_noise(tmp_path, data):
    """Each stored upload is u = c + n with ||c|| <= C and n ~ N(0, sigma^2 I_d), d the
    parameters it holds (usplit: only its segments). So ||n|| - C <= ||u|| <= ||n|| + C, and
    ||n||^2 / sigma^2 ~ chi2(d): ||u|| lies in [sigma sqrt(q_lo) - C, sigma sqrt(q_hi) + C]
    except with probability ALPHA (q the chi-square quantiles at ALPHA/2 and 1 - ALPHA/2).
    C is ~1000 times below the natural update (~0.01 here), which would lengthen ||u|| by
    ~r^2 / (2 sigma sqrt(d)) ~ 5e-3, far outside the window of width ~2 (3.5 sigma + C) ~ 1e-4:
    a missing clip fails the check, and so does a missing noise."""
    clip, z = 1e-5, 1.0
    sigma = clip * z
    fed = Federation(tmp_path, data, method="usplit", rounds=1, seed=3, init_args=[
        "--dp", "local", "--dp-clip", str(clip), "--dp-noise-multiplier", str(z),
        "--dp-delta", str(DELTA)])
    try:
        fed.start_hub()
        for c in fed.clients:
            fed.start_client(c)
        status = fed.wait_for(lambda s: s.federation.finished, what="the federation to end")
        assert status.federation.privacy is not None
        assert status.federation.privacy.epsilon == pytest.approx(accountant_epsilon(z, 1))
        uploads = fed.uploads()
        assert len(uploads) == 2
        sizes = set()
        for u in uploads:
            tensors = load_file(fed.blob(u.sha256))
            d = sum(t.numel() for t in tensors.values())
            sizes.add(d)
            norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
            lo = sigma * math.sqrt(chi2.ppf(ALPHA / 2, d)) - clip
            hi = sigma * math.sqrt(chi2.ppf(1 - ALPHA / 2, d)) + clip
            assert lo <= norm <= hi, (u.client, d, norm, lo, hi)
            meta = upload_metadata(fed.blob(u.sha256))
            # Nothing un-noised about the client's data: no sample count, no loss.
            assert meta["feddiffuse.num_samples"] == "1" and u.num_samples == 1
            assert "feddiffuse.mean_loss" not in meta and u.mean_loss is None
            assert meta["feddiffuse.privacy"] == (f"local clip={clip:g} noise_std={sigma:g} "
                                                  "noise=os-random")
        assert len(sizes) == 2  # usplit: the two clients uploaded different segments
        fed.wait_clients()
        for c in fed.clients:  # the clip did cut: the raw update was longer than C
            assert f"local DP: update clipped to L2 norm {clip:g}" in \
                fed.client_log(c).read_text()
    finally:
        fed.stop()
