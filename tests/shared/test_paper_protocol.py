"""The authors' protocol: last-local personal models, the mean over clients, the sampler, the
centralised baseline with Adam reset every round, CelebA's numbering, and the protocol switch."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from feddiffuse.shared.cli import app
from feddiffuse.shared.cli.evaluate import resolve_sampler
from feddiffuse.shared.data.celeba import (
    AUTHORS_CELEBA_CLASSES,
    CELEBA_CLASSES,
    authors_classes,
    celeba_class,
    from_unit_range,
    to_unit_range,
)
from feddiffuse.shared.diffusion import DiffusionSchedule, SamplerSpec
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.evaluation import MetricResult, evaluate_models
from feddiffuse.shared.experiment import CellOutcome, grid_cells, load_grid
from feddiffuse.shared.experiment_report import markdown, result_rows
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.recipes import PAPER
from feddiffuse.shared.rounds import training_seed
from feddiffuse.shared.simulate import SimulationConfig, _client_images, run_simulation
from feddiffuse.shared.training import train_local
from feddiffuse.shared.wire import load_weights

runner = CliRunner()
QUIET = {"log": lambda _m: None}


# --- the protocol switch -----------------------------------------------------------------------

def test_protocol_paper_sets_every_item_and_explicit_settings_win():
    paper = SimulationConfig(protocol="paper", method="udec")
    assert paper.eval_sampler() == SamplerSpec("ddpm", 1000, False)
    assert paper.eval_sampler().to_dict() == {"name": "ddpm", "steps": 1000, "clip_x0": False,
                                              "eta": None}
    assert paper.grid_sampler() == paper.eval_sampler()  # samples.png too
    assert paper.resolved_personal_model() == "last-local"
    assert paper.resolved_recipe().name == "paper"
    assert paper.resolved_partition_seed() == 2023
    settings = paper.resolved_settings()
    assert settings["celeba_range"] == "[0, 1]" and settings["celeba_classes"] == "male-first"
    # The product's defaults are what they were: DDIM 50 clipped, merged, the fast recipe.
    product = SimulationConfig(method="udec", seed=4)
    assert product.eval_sampler().to_dict()["clip_x0"] is True
    assert (product.eval_sampler().name, product.eval_sampler().steps) == ("ddim", 50)
    assert product.resolved_personal_model() == "merged"
    assert product.resolved_recipe().name == "fast" and product.resolved_partition_seed() == 4
    # Explicit settings win over the protocol's.
    mixed = replace(paper, sampler="ddim", personal_model="merged", recipe="fast",
                    partition_seed=5, eval_steps=7, clip_x0=True)
    assert mixed.eval_sampler() == SamplerSpec("ddim", 7, True)
    assert (mixed.resolved_personal_model(), mixed.resolved_recipe().name,
            mixed.resolved_partition_seed()) == ("merged", "fast", 5)
    # The command lines resolve the same way.
    assert resolve_sampler("paper", None, None, None) == SamplerSpec("ddpm", 1000, False)
    assert resolve_sampler("product", "ddpm", None, None).to_dict()["steps"] == 1000
    assert resolve_sampler("product", None, 9, False) == SamplerSpec("ddim", 9, False)


@pytest.mark.parametrize(("settings", "message"), [
    ({"protocol": "authors"}, "Unknown protocol 'authors'"),
    ({"sampler": "euler"}, "Unknown sampler 'euler'"),
    ({"eval_steps": 1001}, "--steps must be between 1 and 1000"),
    ({"personal_model": "mine"}, "Unknown personal model 'mine'"),
    ({"eval_every": 2}, "--eval-every needs --eval-samples"),
    ({"protocol": "paper", "dataset": "celeba"}, "trains CelebA in \\[0, 1\\]"),
])
def test_protocol_mistakes_are_one_clear_sentence(settings, message):
    with pytest.raises(UserError, match=message):
        SimulationConfig(**settings).validate()


def test_the_commands_refuse_an_unknown_sampler_in_one_sentence(tmp_path):
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--sampler", "euler"])
    assert res.exit_code == 2 and "Unknown sampler 'euler'" in res.output
    assert "Traceback" not in res.output


# --- the mean over clients ---------------------------------------------------------------------

class _MeanPixel:
    """A stand-in evaluator: the metric is the set's mean pixel value (exact and cheap)."""

    def evaluate(self, images):
        value = float(images.float().mean())
        return {"m": MetricResult("m", True, value=value, samples=int(images.shape[0]))}


def test_the_mean_over_clients_is_the_mean_of_each_clients_own_run():
    model = build_unet("tiny", seed=0)
    weights = {f"c{i}": {n: t.detach().clone() for n, t in build_unet("tiny", seed=i)
                         .state_dict().items()} for i in range(3)}
    spec = SamplerSpec("ddim", 2)
    together = evaluate_models(_MeanPixel(), model, weights, 3, sampler=spec, seed=11,
                               personal_model="last-local")
    alone = [evaluate_models(_MeanPixel(), model, {c: w}, 3, sampler=spec, seed=11 + 7919 * j)
             ["headline"]["m"] for j, (c, w) in enumerate(weights.items())]
    entry = together["client_mean"]["m"]
    assert list(entry["values"].values()) == alone
    assert together["headline"]["m"] == entry["mean"] == statistics.fmean(alone)
    assert entry["std"] == statistics.stdev(alone) and entry["clients"] == 3
    # The pooled set is a different, second figure.
    assert together["metrics"]["m"]["samples"] == 9
    assert together["personal_model"] == "last-local"
    assert together["headline_statistic"] == "mean over clients"


def _outcome(cell, evaluation, epochs_rounds=None):
    config = SimulationConfig(method=cell.method, clients=cell.clients, eval_metrics="fid")
    report = {"evaluation": evaluation, "dataset": {"images": 100, "client_sizes": {}},
              "ledger": {"totals": {"total_params": 1, "total_bytes": 1}}, "seconds": 1.0,
              "protocol": {"protocol": "paper"}}
    return CellOutcome(cell, config, report, True, 1.0)


def test_results_put_the_mean_over_clients_first_and_the_pooled_figure_beside_it():
    spec, _, _ = load_grid("paper-fmnist")
    cells = {c.id: c for c in grid_cells(spec)}

    def metric(v):
        return {"fid": {"value": v, "real_vs_real": 1.0}}

    personal = {"models": "personal", "samples": 2000, "metrics": metric(30.0),
                "headline": {"fid": 50.0},
                "per_client": {"a": {"metrics": metric(40.0)}, "b": {"metrics": metric(60.0)}}}
    outcomes = [_outcome(cells["centralised-10rounds-e1-r0"], {"models": "global",
                                                               "metrics": metric(80.0)}),
                _outcome(cells["centralised-15rounds-e1-r0"], {"models": "global",
                                                               "metrics": metric(40.0)}),
                _outcome(cells["full-k2-iid-e5-r0"], {"models": "global",
                                                      "metrics": metric(44.0)}),
                _outcome(cells["udec-k2-iid-e5-r0"], personal)]
    rows, metrics = result_rows(outcomes)
    udec = rows[3]
    assert udec["fid"] == 50.0 and udec["fid_pooled"] == 30.0
    assert udec["fid_clients_std"] == pytest.approx(statistics.stdev([40.0, 60.0]))
    assert (udec["fid_best_client"], udec["fid_worst_client"]) == (40.0, 60.0)
    assert rows[2]["fid_pooled"] is None and rows[2]["headline"] == "one model"
    text = markdown(spec, rows, metrics)
    # Both baselines as columns; the ratios divide by the 15-epoch one (R = 15, the paper's).
    assert "| 2, iid | 44.00 |  | 50.00 |  | 80.00 | 40.00 |" in text
    assert "Ratio to the centralised baseline of 15 epochs" in text
    assert "| 2, iid | 1.10 |  | 1.25 |  |" in text
    assert "| udec-k2-iid-e5-r0 | 50.00 ± 14.14 | 30.00 | 40.00 | 60.00 |" in text


# --- last-local personal models, the curve, evaluate on a simulation folder --------------------

@pytest.fixture(scope="module")
def udec_runs(tmp_path_factory, fmnist_required_module):
    """udec, 2 clients x 24 images, the paper recipe: one run of 1 round and one of 2."""
    base = tmp_path_factory.mktemp("udec")
    globals_by_round: dict[int, dict] = {}

    def config(name, rounds, **extra):
        return SimulationConfig(preset="tiny", method="udec", clients=2, rounds=rounds,
                                limit=48, batch_size=24, seed=2, recipe="paper",
                                sample_count=0, device="cpu", out=str(base / name), **extra)

    one = run_simulation(config("one", 1), **QUIET)
    two = run_simulation(config("two", 2, eval_samples=4, eval_steps=2, eval_every=1,
                                eval_metrics="fd_fmnist", personal_model="last-local"),
                         on_round=lambda r, g: globals_by_round.__setitem__(
                             r, {n: t.clone() for n, t in g.items()}), **QUIET)
    return base, one, two, globals_by_round


def test_the_last_local_model_is_the_one_trained_in_the_last_round_bit_for_bit(udec_runs):
    base, one, two, globals_by_round = udec_runs
    model = build_unet("tiny")
    seg_of = segment_map(model)
    personal = {"encoder", "bottleneck"}
    for cid in ("client-00", "client-01"):
        after_round_1, meta = load_weights(base / "one" / f"local-{cid}.safetensors")
        assert meta["feddiffuse.kind"] == "last-local"
        # Round 2 by hand: its own segments from round 1, the decoder the hub sent.
        start = {n: after_round_1[n] if seg_of[n] in personal else globals_by_round[1][n]
                 for n in seg_of}
        model.load_state_dict(start, strict=True)
        recipe = replace(PAPER, batch_size=24)
        train_local(model, _client_images(SimulationConfig(
            preset="tiny", clients=2, limit=48, seed=2), 28, 1)[1][cid],
            DiffusionSchedule.linear(),
            recipe.train_config(epochs=1, images=24, round_index=2, rounds=2, batch_size=24),
            seed=training_seed(2, 2, cid), device="cpu")
        by_hand = {n: p.detach() for n, p in model.named_parameters()}
        last_local, _ = load_weights(base / "two" / f"local-{cid}.safetensors")
        assert all(torch.equal(last_local[n], by_hand[n]) for n in seg_of), cid
        # The merged model has the aggregated decoder instead, and the same own segments.
        merged, _ = load_weights(base / "two" / f"personal-{cid}.safetensors")
        assert all(torch.equal(merged[n], last_local[n]) for n in seg_of
                   if seg_of[n] in personal)
        assert any(not torch.equal(merged[n], last_local[n]) for n in seg_of
                   if seg_of[n] == "decoder")
    assert two["protocol"]["personal_model"] == "last-local"
    assert two["evaluation"]["personal_model"] == "last-local"


def test_eval_every_writes_a_curve_ending_at_the_final_evaluation(udec_runs):
    _, _, two, _ = udec_runs
    curve = two["curve"]
    assert [p["round"] for p in curve] == [1, 2]
    assert curve[0]["cumulative_bytes"] < curve[1]["cumulative_bytes"] == \
        two["ledger"]["totals"]["total_bytes"]
    assert curve[-1]["headline"] == two["evaluation"]["headline"]
    assert curve[-1]["pooled"]["fd_fmnist"] == two["evaluation"]["metrics"]["fd_fmnist"]["value"]
    assert all(p["headline"]["fd_fmnist"] > 0 for p in curve)


def test_evaluate_on_a_udec_run_reports_the_mean_per_client_values_and_pooled(udec_runs):
    base = udec_runs[0]
    results = {}
    for which in ("last-local", "merged"):
        res = runner.invoke(app, ["evaluate", "--checkpoint", str(base / "two"),
                                  "--personal-model", which, "--sampler", "ddpm", "--steps",
                                  "3", "--no-clip-x0", "--samples", "4", "--metrics",
                                  "fd_fmnist", "--json"])
        assert res.exit_code == 0, res.output
        results[which] = json.loads(res.stdout)
    report = results["last-local"]
    assert report["sampler"] == {"name": "ddpm", "steps": 3, "clip_x0": False, "eta": None,
                                 "seed": 0}
    values = report["client_mean"]["fd_fmnist"]["values"]
    assert sorted(values) == ["client-00", "client-01"]
    assert report["headline"]["fd_fmnist"] == pytest.approx(statistics.fmean(values.values()))
    assert report["metrics"]["fd_fmnist"]["samples"] == 8  # the pooled set, second figure
    assert all(report["per_client"][c]["samples"] == 4 for c in values)
    other = results["merged"]["client_mean"]["fd_fmnist"]["values"]
    assert other != values  # another model per client, so other images


# --- the centralised baseline ------------------------------------------------------------------

@pytest.mark.requires_fmnist
def test_the_centralised_baseline_resets_adam_every_round(tmp_path):
    spec, _, _ = load_grid("paper-fmnist")
    base = [c for c in grid_cells(spec) if c.centralised]
    assert {(c.clients, c.local_epochs) for c in base} == {(1, 1)}
    assert SimulationConfig(**{k: v for k, v in spec.simulation.items()}) \
        .resolved_recipe().keep_optimizer is False

    def simulate(name, recipe, rounds_seen):  # K = 1, 2 rounds of 1 epoch, 2 steps each
        config = SimulationConfig(preset="tiny", clients=1, rounds=2, limit=32, seed=3,
                                  sample_count=0, device="cpu", out=str(tmp_path / name))
        report = run_simulation(config, recipe=recipe, on_round=lambda r, g: rounds_seen
                                .__setitem__(r, {n: t.clone() for n, t in g.items()}), **QUIET)
        return load_weights(report["files"]["weights"]["global"])[0]

    recipe = replace(PAPER, batch_size=16)
    fresh_rounds: dict[int, dict] = {}
    fresh = simulate("fresh", recipe, fresh_rounds)
    carried = simulate("carried", replace(recipe, keep_optimizer=True), {})
    images = _client_images(SimulationConfig(preset="tiny", clients=1, limit=32, seed=3),
                            28, 1)[1]["client-00"]

    def by_hand(start, r):  # one call of the training loop: a new Adam
        model = build_unet("tiny")
        model.load_state_dict(start)
        train_local(model, images, DiffusionSchedule.linear(),
                    recipe.train_config(epochs=1, images=32, round_index=r, rounds=2,
                                        batch_size=16),
                    seed=training_seed(3, r, "client-00"), device="cpu")
        return {n: p.detach() for n, p in model.named_parameters()}

    def gap(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in b)

    initial = {n: p.detach() for n, p in build_unet("tiny", seed=3).named_parameters()}
    round_1 = by_hand(initial, 1)
    round_2 = by_hand(fresh_rounds[1], 2)  # from the simulator's round-1 global model
    # FedAvg over one client adds its delta back: the same weights up to float rounding.
    assert gap(fresh_rounds[1], round_1) < 1e-6
    assert gap(fresh, round_2) < 1e-6
    # Carried moments would have moved round 2 elsewhere, by far more than rounding.
    assert gap(carried, round_2) > 100 * max(gap(fresh, round_2), 1e-7)


# --- CelebA ------------------------------------------------------------------------------------

def test_celeba_under_the_authors_numbering_and_range():
    attributes = ("Male", "Young", "Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")

    def attrs(male, young, hair):
        values = dict.fromkeys(attributes, -1)
        values.update({"Male": male, "Young": young, hair: 1})
        return values

    # The authors' celeba_labels: male young 0-3, male old 4-7, female young 8-11, old 12-15.
    assert celeba_class(attrs(1, 1, "Black_Hair"), "male-first") == 0
    assert celeba_class(attrs(1, -1, "Gray_Hair"), "male-first") == 7
    assert celeba_class(attrs(-1, 1, "Brown_Hair"), "male-first") == 9
    assert celeba_class(attrs(-1, -1, "Blond_Hair"), "male-first") == 14
    for male in (1, -1):
        for young in (1, -1):
            for hair in attributes[2:]:
                ours = celeba_class(attrs(male, young, hair))
                theirs = celeba_class(attrs(male, young, hair), "male-first")
                assert int(authors_classes(torch.tensor([ours]))) == theirs
                assert AUTHORS_CELEBA_CLASSES[theirs] == CELEBA_CLASSES[ours]
    assert AUTHORS_CELEBA_CLASSES[0] == "male-young-black"
    with pytest.raises(UserError, match="numbering"):
        celeba_class(attrs(1, 1, "Black_Hair"), "alphabetical")
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_unit_range(pixels), torch.tensor([0.0, 0.2, 1.0]))
    assert torch.equal(from_unit_range(to_unit_range(pixels)), pixels)


def test_celeba_partitions_follow_the_protocols_numbering(tmp_path, monkeypatch):
    """The label skew draws per class in class order, so the numbering changes the split."""
    from feddiffuse.shared import simulate as simulate_module
    from feddiffuse.shared.data.dataset import ImageDataset

    labels = torch.arange(16).repeat_interleave(8)
    data = ImageDataset("celeba", torch.zeros(128, 3, 8, 8, dtype=torch.uint8), labels, 16)
    seen = {}

    def fake_partition(n, k, split, labels, beta, seed):
        seen["labels"] = labels
        return [torch.arange(0, 64), torch.arange(64, 128)]

    monkeypatch.setattr(simulate_module, "load_dataset", lambda *a, **k: data)
    monkeypatch.setattr(simulate_module, "partition_indices", fake_partition)
    config = SimulationConfig(dataset="celeba", clients=2, split="label-skew")
    _client_images(config, 8, 3)
    assert torch.equal(seen["labels"], labels)  # the product's numbering
    _client_images(replace(config, protocol="paper"), 8, 3)
    assert torch.equal(seen["labels"], (labels + 8) % 16)  # the authors': male first


# --- the GPU script at its CPU size ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.requires_fmnist
def test_the_gpu_paper_cell_script_runs_at_its_smoke_size(tmp_path):
    script = Path(__file__).parents[2] / "packaging" / "gpu" / "paper_cell.py"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, env=env, timeout=900)

    done = run("--smoke", "--out", str(tmp_path / "g"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["smoke"] and summary["protocol"] == "paper"
    full, udec = summary["cells"]
    assert (full["cell"], udec["cell"]) == ("full", "udec")
    assert (full["authors"], full["authors_std"]) == (39.44, 4.16)
    assert (udec["authors"], udec["authors_std"]) == (51.10, 14.62)
    assert full["value"] > 0 and full["pooled"] is None
    assert udec["value"] > 0 and udec["pooled"] > 0 and udec["clients_std"] is not None
    assert udec["sampler"]["name"] == "ddpm" and udec["sampler"]["clip_x0"] is False
    report = json.loads((tmp_path / "g" / "udec" / "report.json").read_text())
    assert report["protocol"]["personal_model"] == "last-local"
    assert len(report["evaluation"]["per_client"]) == 5
    assert "authors 39.44 ± 4.16" in done.stdout and "authors 51.10 ± 14.62" in done.stdout
    again = run("--smoke", "--out", str(tmp_path / "g"))  # finished cells are not rerun
    assert again.returncode == 0 and json.loads((tmp_path / "g" / "summary.json").read_text(
    ))["cells"][0]["ran_now"] is False
    wrong = run("--cells", "nope", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 2 and "Unknown cell(s) nope" in wrong.stderr
