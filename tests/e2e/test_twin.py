"""The twin property: `simulate` and a real federation are the same computation.

A simulation over the client folders, with the federation's seed, method and recipe (read
from the hub's own manifest), and a federation on loopback (`feddiffuse-hub serve` and one
`feddiffuse-client join` process per folder) must produce bit-identical global models round
by round, and for a method with personal segments the same personal models. This is what lets
a researcher take the simulator's numbers as the product's.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from federation_fixtures import Federation, partition
from safetensors.torch import load_file

from feddiffuse.hub.paths import HubPaths
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.protocol import API_PREFIX, Manifest
from feddiffuse.shared.recipes import recipe_from_training
from feddiffuse.shared.simulate import SimulationConfig, run_simulation

pytestmark = [pytest.mark.slow, pytest.mark.requires_fmnist]

CLIENTS = ("client-00", "client-01")
ROUNDS = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fmnist_required_module) -> Path:
    """Two clients' folders of 24 Fashion-MNIST images each."""
    return partition(tmp_path_factory.mktemp("twin") / "clients", clients=2, limit=48, seed=5)


def first_manifest(fed: Federation) -> Manifest:
    r = httpx.get(f"{fed.url}{API_PREFIX}/manifest", timeout=30,
                  headers={"Authorization": f"Bearer {fed.tokens[CLIENTS[0]]}"})
    r.raise_for_status()
    return Manifest.model_validate_json(r.content)


def hub_globals(fed: Federation) -> dict[int, dict[str, torch.Tensor]]:
    """The global model after each round, from the hub's blob folder: round r's result is
    round r+1's base version, the last one is the final global version."""
    status = fed.status()
    versions = [row.global_version for row in status.history][1:]
    final = first_manifest(fed).global_version
    blobs = HubPaths(fed.root).blobs
    return {r: load_file(blobs / f"{v}.safetensors")
            for r, v in enumerate([*versions, final], start=1)}


@pytest.mark.parametrize(("method", "codecs"), [
    ("full", ("fp32", "fp32")), ("usplit", ("fp32", "fp32")), ("udec", ("fp32", "fp32")),
    # top-k + int8 uploads with error feedback, int8 updates downloaded and applied
    ("usplit", ("topk:0.05+int8", "int8"))],
    ids=["full", "usplit", "udec", "usplit-topk+int8-up-int8-down"])
def test_simulate_and_a_real_federation_give_the_same_models_round_by_round(
        method, codecs, tmp_path, folders):
    fed = Federation(tmp_path / "fed", folders, method=method, clients=CLIENTS, rounds=ROUNDS,
                     seed=7, batch_size=8, uplink_codec=codecs[0], downlink_codec=codecs[1])
    try:
        fed.start_hub()
        recipe = recipe_from_training(first_manifest(fed).training)  # what the clients train
        for c in CLIENTS:
            fed.start_client(c)
        fed.wait_for(lambda s: s.federation.finished, what="the federation to finish")
        fed.wait_clients()
        federated = hub_globals(fed)
    finally:
        fed.stop()

    simulated: dict[int, dict[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each client process trains (OMP_NUM_THREADS=1)
    try:
        report = run_simulation(
            SimulationConfig(preset="tiny", method=method, rounds=ROUNDS, local_epochs=1,
                             seed=7, client_folders=str(folders), out=str(tmp_path / "sim"),
                             device="cpu", sample_count=0, uplink_codec=codecs[0],
                             downlink_codec=codecs[1]),
            log=lambda _m: None, recipe=recipe,
            on_round=lambda r, g: simulated.__setitem__(r, {n: t.clone() for n, t in g.items()}))
    finally:
        torch.set_num_threads(threads)
    assert sorted(report["dataset"]["client_sizes"]) == list(CLIENTS)

    assert sorted(federated) == sorted(simulated) == list(range(1, ROUNDS + 1))
    for r in range(1, ROUNDS + 1):
        assert federated[r].keys() == simulated[r].keys()
        different = [n for n in simulated[r] if not torch.equal(federated[r][n], simulated[r][n])]
        assert not different, f"round {r}: {len(different)} tensors differ, e.g. {different[:3]}"

    if personal_segments(method):  # each client's own segments, kept on its machine
        seg_of = segment_map(build_unet("tiny"))
        for c in CLIENTS:
            kept = next((fed.home(c) / "client" / "hubs").glob("*/personal.safetensors"))
            mine = load_file(kept)
            sim = load_file(tmp_path / "sim" / f"personal-{c}.safetensors")
            assert mine and all(seg_of[n] in personal_segments(method) for n in mine)
            for n, t in mine.items():
                assert torch.equal(t, sim[n]), f"{c}: personal tensor {n} differs"
