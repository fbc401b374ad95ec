"""The research CLI: JSON outputs and one-sentence errors with exit code 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

from feddiffuse.shared.cli import app

runner = CliRunner()


def test_info_json_has_total_and_segments():
    res = runner.invoke(app, ["info", "--preset", "paper-fmnist", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["total_params"] == 2_996_315
    assert data["segments"] == {"encoder": 1_280_642, "bottleneck": 999_376,
                                "decoder": 716_297}


def test_info_text():
    res = runner.invoke(app, ["info", "--preset", "tiny"])
    assert res.exit_code == 0 and "encoder" in res.output and "total" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "--preset", "huge"], "Unknown preset 'huge'"),
        (["comm", "--method", "fedsgd"], "Unknown method 'fedsgd'"),
        (["comm", "--clients", "0"], "at least 1"),
        (["simulate", "--preset", "nope"], "Unknown preset"),
        (["simulate", "--method", "nope"], "Unknown method"),
        (["simulate", "--split", "nope"], "Unknown split"),
        (["simulate", "--dataset", "mnist"], "Unknown dataset 'mnist'"),
        (["partition", "--split", "sideways"], "Unknown split"),
    ],
)
def test_user_mistakes_exit_2_with_one_sentence(args, message, tmp_path):
    res = runner.invoke(app, [*args] + (["--out", str(tmp_path / "o")]
                                        if args[0] == "simulate" else []))
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_empty_image_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    res = runner.invoke(app, ["simulate", "--dataset", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "No usable images found" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.requires_fmnist
def test_more_clients_than_images_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["simulate", "--clients", "20", "--limit", "10",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "client" in res.output.lower()
    assert not (tmp_path / "o").exists()


def test_image_folder_simulation_runs(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        arr = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    res = runner.invoke(app, ["simulate", "--dataset", str(tmp_path / "imgs"), "--clients", "2",
                              "--rounds", "1", "--batch-size", "6", "--samples", "2",
                              "--sample-steps", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["dataset"]["images"] == 12


@pytest.mark.requires_fmnist
def test_partition_prints_the_class_table():
    res = runner.invoke(app, ["partition", "--clients", "5", "--split", "label-skew",
                              "--limit", "3000", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data["table"]) == 5 and len(data["table"][0]) == 10
    assert sum(map(sum, data["table"])) == 3000
    text = runner.invoke(app, ["partition", "--clients", "3", "--limit", "300"])
    assert text.exit_code == 0 and "T-shirt" in text.output


@pytest.mark.requires_fmnist
def test_partition_export_writes_one_png_folder_per_client(tmp_path):
    from feddiffuse.shared.data import load_dataset, load_image_folder, partition_indices

    out = tmp_path / "clients"
    real = load_dataset("fashion-mnist", image_size=28, channels=1, limit=90, seed=1)
    parts = partition_indices(90, 3, "quantity-skew", labels=real.labels, seed=1)
    res = runner.invoke(app, ["partition", "--clients", "3", "--split", "quantity-skew",
                              "--limit", "90", "--seed", "1", "--export", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert sorted(p.name for p in out.iterdir()) == ["client-00", "client-01", "client-02"]
    for i, cid in enumerate(sorted(data["export"])):
        pngs = list((out / cid).glob("*.png"))
        assert len(pngs) == data["sizes"][i]
        loaded = load_image_folder(out / cid, 28, 1)
        assert torch.equal(loaded.images, real.images[parts[i]])  # pixel-exact
    again = runner.invoke(app, ["partition", "--clients", "3", "--limit", "90",
                                "--export", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
