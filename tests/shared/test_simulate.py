"""The simulator end to end on a small real Fashion-MNIST subset."""

import json

import pytest
import torch
from typer.testing import CliRunner

from feddiffuse.shared.cli import app
from feddiffuse.shared.comm import replay_ledger
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.wire import load_weights

pytestmark = pytest.mark.requires_fmnist

ARGS = ["--preset", "tiny", "--dataset", "fashion-mnist", "--clients", "3", "--rounds", "2",
        "--local-epochs", "1", "--limit", "240", "--batch-size", "64", "--seed", "4",
        "--samples", "6", "--sample-steps", "3"]


def run(out, method, *extra):
    res = CliRunner().invoke(app, ["simulate", *ARGS, "--method", method, "--out", str(out),
                                   *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text()), res.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    return {m: (base / m, *run(base / m, m)) for m in ("full", "usplit", "ulatdec", "udec")}


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_report_has_config_rounds_losses_and_ledger(runs, method):
    out, report, output = runs[method]
    assert report["config"]["method"] == method
    assert report["dataset"]["images"] == 240
    assert sum(report["dataset"]["client_sizes"].values()) == 240
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert len(r["clients"]) == 3
        assert all(0 < c["mean_loss"] < 2 for c in r["clients"])
    assert "round 2/2 done" in output
    assert (out / "samples.png").stat().st_size > 100
    # The ledger equals the replay without training (same seed, same assignments).
    replay = replay_ledger("tiny", method, 3, 2, seed=4).totals()
    assert report["ledger"]["totals"]["total_params"] == replay["total_params"]
    assert abs(report["ledger"]["totals"]["total_bytes"] - replay["total_bytes"]) < 3 * 2 * 2 * 8


def test_usplit_uploads_only_assigned_segments(runs):
    _, report, _ = runs["usplit"]
    for r in report["rounds"]:
        uploaded = [tuple(c["uploaded"]) for c in r["clients"]]
        assert all(len(u) < 3 for u in uploaded)
        flat = [s for u in uploaded for s in u]
        assert flat.count("encoder") + flat.count("decoder") == 3  # everyone reports one side
        assert flat.count("bottleneck") == 2  # one per pair, one for the unpaired client


def test_personal_models_keep_their_own_encoder(runs):
    model = build_unet("tiny", seed=4)  # the simulator's initial model for seed 4
    seg = segment_map(model)
    initial = {n: p.detach() for n, p in model.named_parameters()}
    for method, personal in (("ulatdec", {"encoder"}), ("udec", {"encoder", "bottleneck"})):
        out, report, _ = runs[method]
        glob, meta = load_weights(out / "global.safetensors")
        assert meta["feddiffuse.preset"] == "tiny"
        files = sorted(out.glob("personal-*.safetensors"))
        assert len(files) == 3
        p0, _ = load_weights(files[0])
        p1, _ = load_weights(files[1])
        for name, s in seg.items():
            if s in personal:
                assert torch.equal(glob[name], initial[name]), name  # never aggregated
                assert not torch.equal(p0[name], p1[name]), name  # each client's own
            else:
                assert torch.equal(p0[name], glob[name]) and torch.equal(p1[name], glob[name])


def test_full_global_model_moves_and_is_reproducible(runs, tmp_path):
    out, report, _ = runs["full"]
    assert not list(out.glob("personal-*"))
    again, _ = run(tmp_path / "again", "full")
    a, _ = load_weights(out / "global.safetensors")
    b, _ = load_weights(tmp_path / "again" / "global.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [c["mean_loss"] for r in report["rounds"] for c in r["clients"]] == \
           [c["mean_loss"] for r in again["rounds"] for c in r["clients"]]
    init = {n: p.detach() for n, p in build_unet("tiny", seed=4).named_parameters()}
    assert any(not torch.equal(a[n], init[n]) for n in a)


def test_one_client_is_the_centralised_baseline(tmp_path):
    res = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--clients", "1",
                                   "--rounds", "1", "--limit", "64", "--batch-size", "64",
                                   "--samples", "0", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["dataset"]["client_sizes"] == {"client-00": 64}
    assert report["files"]["samples"] is None


def test_recipes_through_the_simulator(tmp_path):
    """The paper's recipe, the EMA's two files, and carried optimiser state, end to end."""
    from dataclasses import replace

    from feddiffuse.shared.recipes import FAST, PAPER
    from feddiffuse.shared.simulate import SimulationConfig, run_simulation

    def sim(name, recipe):  # 2 clients x 48 images, batch 32: 2 steps a round each
        config = SimulationConfig(preset="tiny", method="usplit", clients=2, rounds=2,
                                  limit=96, seed=1, out=str(tmp_path / name), sample_count=0)
        return run_simulation(config, log=lambda m: None, recipe=recipe)

    def weights(report, which="global"):
        return load_weights(report["files"]["weights"][which])

    # The paper's recipe from the command line gives the same bytes, with no EMA file.
    paper = sim("paper", replace(PAPER, batch_size=32))
    assert paper["recipe"]["name"] == "paper" and "global-raw" not in paper["files"]["weights"]
    res = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--method", "usplit",
                                   "--clients", "2", "--rounds", "2", "--limit", "96",
                                   "--seed", "1", "--samples", "0", "--recipe", "paper",
                                   "--batch-size", "32", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "global.safetensors").read_bytes() == \
        (tmp_path / "paper" / "global.safetensors").read_bytes()

    ema_recipe = replace(FAST, ema_decay=0.5)
    report = sim("ema", ema_recipe)
    raw, meta_raw = weights(report, "global-raw")
    ema, meta = weights(report)
    assert meta["feddiffuse.kind"] == "global-ema" and meta_raw["feddiffuse.kind"] == "global"
    assert any(not torch.equal(ema[n], raw[n]) for n in raw)
    # The EMA never feeds back into training: without it the last aggregate is the same.
    plain, _ = weights(sim("no-ema", replace(ema_recipe, ema_decay=None)))
    assert all(torch.equal(plain[n], raw[n]) for n in raw)

    kept, _ = weights(sim("kept", replace(FAST, keep_optimizer=True)))
    fresh, _ = weights(sim("fresh", replace(FAST, keep_optimizer=False)))
    assert any(not torch.equal(kept[n], fresh[n]) for n in kept)  # round 2: other moments
    again, _ = weights(sim("kept-again", replace(FAST, keep_optimizer=True)))
    assert all(torch.equal(kept[n], again[n]) for n in kept)


def test_codecs_through_the_simulator_match_the_replay_to_the_byte(tmp_path):
    method, up, down = "usplit", "topk:0.05+int8", "int8"
    from feddiffuse.shared.payloads import LinkCodecs
    from feddiffuse.shared.simulate import SimulationConfig, run_simulation

    config = SimulationConfig(preset="tiny", method=method, clients=2, rounds=2, limit=64,
                              seed=1, out=str(tmp_path / "sim"), sample_count=0,
                              batch_size=32, uplink_codec=up, downlink_codec=down)
    report = run_simulation(config, log=lambda m: None)
    assert report["config"]["uplink_codec"] == up
    replay = replay_ledger("tiny", method, 2, 2, seed=1, samples_per_client=32,
                           links=LinkCodecs.parse(up, down)).totals()
    assert report["ledger"]["totals"] == replay
    fp32 = replay_ledger("tiny", method, 2, 2, seed=1, samples_per_client=32).totals()
    assert replay["total_bytes"] < 0.3 * fp32["total_bytes"]
    assert replay["total_params"] == fp32["total_params"]
    global_state, _ = load_weights(tmp_path / "sim" / "global.safetensors")
    assert all(torch.isfinite(t).all() for t in global_state.values())
