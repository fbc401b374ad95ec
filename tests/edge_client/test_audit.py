"""The memorisation audit on the client: `feddiffuse-client audit`, run_audit and what they
say to a data owner. A model that memorised 16 of the owner's images is flagged; the same
model is not flagged for an owner whose images it never saw."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from edge_audit import URL, holding, write_pngs
from support import memorising
from typer.testing import CliRunner

from feddiffuse.edge_client.audit import audits_dir, run_audit
from feddiffuse.edge_client.cli import app
from feddiffuse.edge_client.settings import Settings
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.shared.model import build_unet

runner = CliRunner()


@pytest.fixture(scope="module")
def fmnist(fmnist_required_module) -> torch.Tensor:
    return memorising.fmnist_train_images()


def test_a_model_that_memorised_the_owners_images_is_flagged_and_not_for_others(
        fmnist, tmp_path):
    store = holding(memorising.load_weights())
    # The owner of 64 images, 16 of which the model memorised; another owner of 64 others.
    owner = write_pngs(tmp_path / "owner", fmnist[:64])
    other = write_pngs(tmp_path / "other", fmnist[1000:1064])
    assert set(memorising.MEMORISED) <= set(range(64))
    mine = run_audit(store, owner, 32, steps=25, out=tmp_path / "mine.png")
    theirs = run_audit(store, other, 32, steps=25, out=tmp_path / "theirs.png")
    print("\n".join(mine.lines() + theirs.lines()))  # the measured rates, with -s
    assert mine.result.flagged, mine.lines()
    assert mine.result.spaces["pixels"].copy_rate >= 0.5
    assert all(p.own in memorising.MEMORISED for p in mine.result.pairs)
    assert not theirs.result.flagged, theirs.lines()
    assert all(s.copy_rate <= 0.1 for s in theirs.result.spaces.values())
    assert mine.result.feature_space == "fmnist"
    report = json.loads(mine.report_path.read_text())
    assert report["flagged"] is True and report["pairs_png"] == str(tmp_path / "mine.png")
    assert (tmp_path / "mine.png").is_file() and (tmp_path / "theirs.png").is_file()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_sentence(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_cli_mistakes_say_what_to_do_and_write_nothing(tmp_path, fmnist):
    one_sentence(invoke("audit"), "join one first")
    store = holding(None)
    Settings(hub_url=URL, data_dir=str(write_pngs(tmp_path / "own", fmnist[:12]))).save()
    one_sentence(invoke("audit"), "There is no model", "join the federation first")
    store = holding(build_unet("tiny", seed=0).state_dict())
    one_sentence(invoke("audit", "--data", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    one_sentence(invoke("audit", "--data", str(tmp_path / "empty")), "No images found")
    few = write_pngs(tmp_path / "few", fmnist[:5])
    one_sentence(invoke("audit", "--data", str(few)), "5 usable image(s), too few",
                 "at least 10")
    one_sentence(invoke("audit", "--out", str(tmp_path)), "is a folder")
    (tmp_path / "a-file").write_text("")
    one_sentence(invoke("audit", "--n", "2", "--steps", "1", "--data", str(tmp_path / "own"),
                        "--out", str(tmp_path / "a-file" / "pairs.png")), "Cannot write",
                 "choose another --out")
    assert not audits_dir(store).exists()


def test_cli_audit_of_a_fresh_model_with_json(tmp_path, fmnist):
    holding(build_unet("tiny", seed=0).state_dict())
    own = write_pngs(tmp_path / "own", fmnist[:12])
    Settings(hub_url=URL, data_dir=str(own)).save()
    result = invoke("audit", "--n", "4", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["flagged"] is False and report["samples"] == 4 and report["own_images"] == 12
    assert report["feature_space"] == "fmnist" and report["seed"] == 0
    assert set(report["spaces"]) == {"pixels", "fmnist"}
    assert Path(report["pairs_png"]).parent == audits_dir(HubFolder(URL))
    assert "sampling: 100%" in result.stderr  # progress goes to stderr, the JSON to stdout
    text = invoke("audit", "--n", "4", "--steps", "2", "--out", str(tmp_path / "a.png"))
    assert text.exit_code == 0, text.output
    assert "nothing left this computer" in text.stdout and "not flagged" in text.stdout
    assert f"Pairs: {tmp_path / 'a.png'}" in text.stdout


def test_the_audit_opens_no_connection(tmp_path, fmnist, monkeypatch):
    store = holding(build_unet("tiny", seed=0).state_dict())
    own = write_pngs(tmp_path / "own", fmnist[:12])

    def refuse(*_args, **_kwargs):
        raise AssertionError("the audit tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    audit = run_audit(store, own, 2, steps=1, out=tmp_path / "p.png")
    assert audit.pairs_path.is_file()
