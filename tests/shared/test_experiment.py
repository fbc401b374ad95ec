"""Experiment grids: parsing, the shipped grids, a tiny grid end to end, and resuming."""

import csv
import json

import pytest
from typer.testing import CliRunner

from feddiffuse.shared import experiment as experiment_module
from feddiffuse.shared.cli import app
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.experiment import (
    cell_config,
    grid_cells,
    load_grid,
    parse_grid,
    repeat_counts,
    shipped_grids,
    with_overrides,
)

runner = CliRunner()

TINY_GRID = """
name = "tiny-test"
description = "Two methods at K = 2 on a handful of images."
seed = 3

[simulation]
preset = "tiny"
dataset = "fashion-mnist"
limit = 64
rounds = 1
batch_size = 32
sample_count = 4
sample_steps = 2
eval_samples = 8
eval_steps = 2
eval_metrics = "fd_fmnist,kid"
eval_personal = "split"

[[sweep]]
methods = ["full", "udec"]
clients = [2]
splits = ["iid"]
local_epochs = [1]
"""


def test_shipped_grids_load_and_every_cell_is_valid(tmp_path):
    assert {"cpu-small", "paper-fmnist", "codec-frontier"} <= set(shipped_grids())
    for name in ("cpu-small", "paper-fmnist", "codec-frontier"):
        spec, text, path = load_grid(name)
        assert spec.name == name and path.suffix == ".toml" and text
        cells = grid_cells(spec)
        ids = [c.id for c in cells]
        assert len(ids) == len(set(ids))
        assert sum(c.centralised for c in cells) >= 1
        for cell in cells:
            cell_config(spec, cell, tmp_path)  # validates every setting


def test_cpu_small_is_the_documented_grid():
    spec, _, _ = load_grid("cpu-small")
    cells = grid_cells(spec)
    fed = [c for c in cells if not c.centralised]
    assert {c.method for c in fed} == {"full", "usplit", "ulatdec", "udec"}
    assert {c.clients for c in fed} == {2, 5}
    assert {c.split for c in fed} == {"iid", "quantity-skew"}
    assert spec.simulation["preset"] == "tiny" and spec.simulation["eval_steps"] == 50
    assert spec.simulation["eval_samples"] >= 500
    assert "fd_fmnist" in spec.simulation["eval_metrics"]


def test_paper_grid_has_the_authors_cells_and_repeats():
    spec, _, _ = load_grid("paper-fmnist")
    cells = grid_cells(spec)
    fed = [c for c in cells if not c.centralised]
    assert spec.simulation["protocol"] == "paper" and spec.simulation["rounds"] == 15
    assert spec.simulation["eval_samples"] == 1000 and "fid" in spec.simulation["eval_metrics"]
    # The method comparison: every method at K in {2, 5, 10} x every split, E = 5.
    comparison = {(c.method, c.clients, c.split) for c in fed if c.local_epochs == 5}
    assert comparison == {(m, k, s) for m in ("full", "usplit", "udec", "ulatdec")
                          for k in (2, 5, 10)
                          for s in ("iid", "label-skew", "quantity-skew")}
    # The local-epoch sweep: full only, IID, K in {2, 5, 10}, E in {1, 2, 3, 5, 8}.
    sweep = {(c.method, c.clients, c.split, c.local_epochs) for c in fed if c.local_epochs != 5}
    assert sweep == {("full", k, "iid", e) for k in (2, 5, 10) for e in (1, 2, 3, 8)}
    counts = repeat_counts(cells)
    for cell in fed:  # 5 runs per configuration, 3 at K = 10, as the authors ran
        assert counts[cell.configuration] == (3 if cell.clients == 10 else 5), cell.id
    # The centralised baseline as the authors ran it: K = 1, N rounds of one epoch.
    base = [c for c in cells if c.centralised]
    assert {(c.clients, c.rounds, c.local_epochs) for c in base} == {(1, 10, 1), (1, 15, 1)}
    assert all(counts[c.configuration] == 5 for c in base)
    # 2 baselines x 5, (24 comparison + 8 sweep) configurations x 5, (12 + 4) at K = 10 x 3.
    assert len(cells) == 2 * 5 + (24 + 8) * 5 + (12 + 4) * 3 == 218


def test_the_paper_grid_dry_run_lists_the_configurations_and_repeats(tmp_path):
    res = runner.invoke(app, ["experiment", "paper-fmnist", "--dry-run", "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "218 cells" in res.output and "protocol paper" in res.output
    assert "50 configurations (repeats):" in res.output
    for line in ("centralised-15rounds-e1: 5 repeats", "centralised-10rounds-e1: 5 repeats",
                 "udec-k5-quantity-skew-e5: 5 repeats", "full-k10-iid-e8: 3 repeats",
                 "ulatdec-k10-label-skew-e5: 3 repeats", "full-k2-iid-e1-r4: to run"):
        assert line in res.output, line
    assert "full-k10-iid-e8-r3" not in res.output  # K = 10 stops after 3 repeats


def test_command_line_settings_replace_the_grids_in_every_cell(tmp_path):
    spec = with_overrides(parse_grid(TINY_GRID), protocol="paper", sampler="ddim",
                          eval_steps=3, clip_x0=None, personal_model="merged")
    for cell in grid_cells(spec):
        config = cell_config(spec, cell, tmp_path)
        assert (config.protocol, config.sampler, config.eval_steps) == ("paper", "ddim", 3)
        assert config.clip_x0 is None and config.resolved_personal_model() == "merged"
        assert config.resolved_recipe().name == "paper"  # the rest is the protocol's
    assert with_overrides(spec) is spec


def test_a_sweep_with_its_own_repeats_and_fixed_baselines_in_rounds():
    grid = TINY_GRID.replace("seed = 3", "seed = 3\nrepeats = 2\ncentralised_mode = 'rounds'"
                             "\ncentralised_epochs = [2, 3]")
    grid += "\n[[sweep]]\nmethods = ['full']\nclients = [4]\nrepeats = 1\n"
    cells = grid_cells(parse_grid(grid))
    assert [c.id for c in cells] == [
        "centralised-2rounds-e1-r0", "centralised-3rounds-e1-r0", "full-k2-iid-e1-r0",
        "udec-k2-iid-e1-r0", "full-k4-iid-e1-r0",
        "centralised-2rounds-e1-r1", "centralised-3rounds-e1-r1", "full-k2-iid-e1-r1",
        "udec-k2-iid-e1-r1"]
    assert [(c.rounds, c.local_epochs, c.epochs) for c in cells[:2]] == [(2, 1, 2), (3, 1, 3)]
    with pytest.raises(UserError, match="centralised_epochs"):
        parse_grid(grid.replace("[2, 3]", "[0]"))


def test_repeats_get_their_own_seed_and_baselines():
    spec = parse_grid(TINY_GRID.replace('seed = 3', 'seed = 3\nrepeats = 2'))
    cells = grid_cells(spec)
    assert [c.id for c in cells] == [
        "centralised-e1-r0", "full-k2-iid-e1-r0", "udec-k2-iid-e1-r0",
        "centralised-e1-r1", "full-k2-iid-e1-r1", "udec-k2-iid-e1-r1"]
    assert [c.seed for c in cells] == [3, 3, 3, 4, 4, 4]
    base = cells[0]
    assert (base.clients, base.rounds, base.local_epochs) == (1, 1, 1)  # R x E epochs
    three = grid_cells(parse_grid(TINY_GRID.replace("rounds = 1", "rounds = 3")))
    assert (three[0].rounds, three[0].local_epochs, three[1].rounds) == (1, 3, 3)


@pytest.mark.parametrize(("edit", "message"), [
    (("[simulation]", "[simulation]\nmethod = 'full'"), "may not set 'method'"),
    (("[simulation]", "[simulation]\nwarp = 9"), "unknown setting 'warp'"),
    (('name = "tiny-test"', 'name = "t"\ncolour = 1'), "colour"),
    (('methods = ["full", "udec"]', "methods = []"), "sweep.0.methods"),
    (("[[sweep]]", "[[sweep"), "not valid TOML"),
])
def test_grid_mistakes_are_one_clear_sentence(edit, message):
    with pytest.raises(UserError, match=message):
        parse_grid(TINY_GRID.replace(*edit), "g.toml")


def test_unknown_grid_names_the_shipped_ones(tmp_path):
    res = runner.invoke(app, ["experiment", "no-such-grid", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "cpu-small" in res.output and "paper-fmnist" in res.output


@pytest.mark.requires_fmnist
def test_tiny_grid_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    grid = tmp_path / "tiny.toml"
    grid.write_text(TINY_GRID)
    out = tmp_path / "out"
    res = runner.invoke(app, ["experiment", str(grid), "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "3 cell(s) to run, 2 at a time with 1 thread(s) each" in res.output
    assert "3 cell(s) run, 0 finished earlier" in res.output
    for name in ("results.csv", "per_client.csv", "results.md", "grid.toml",
                 "fd_fmnist-vs-clients.png", "kid_fmnist-vs-clients.png",
                 "communication-k2.png", "samples-per-method.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in rows] == ["centralised-e1-r0", "full-k2-iid-e1-r0",
                                         "udec-k2-iid-e1-r0"]
    assert all(float(r["fd_fmnist"]) > 0 and float(r["fd_fmnist_real_vs_real"]) > 0
               for r in rows)
    assert rows[2]["fd_fmnist_worst_client"] != "" and rows[1]["fd_fmnist_worst_client"] == ""
    assert int(rows[2]["total_params"]) < int(rows[1]["total_params"])  # udec sends less
    md = (out / "results.md").read_text()
    assert "| K, split | full | udec | centralised |" in md
    assert "| 2, iid | " in md and "Ratio to the centralised baseline" in md
    clients = list(csv.DictReader((out / "per_client.csv").open()))
    assert {r["client"] for r in clients} == {"client-00", "client-01"}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/report.json")}
    assert len(stamps) == 3

    def must_not_run(*_a, **_k):
        raise AssertionError("a finished cell was run again")

    real_run = experiment_module.run_simulation
    monkeypatch.setattr(experiment_module, "run_simulation", must_not_run)
    again = runner.invoke(app, ["experiment", str(grid), "--out", str(out), "--no-plots"])
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier, skipped") == 3
    assert "0 cell(s) run, 3 finished earlier" in again.output
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/report.json")}

    # An unfinished cell (no report.json) runs again; the finished ones still do not.
    (out / "cells" / "udec-k2-iid-e1-r0" / "report.json").unlink()
    monkeypatch.setattr(experiment_module, "run_simulation", real_run)
    third = runner.invoke(app, ["experiment", str(grid), "--out", str(out), "--no-plots"])
    assert third.exit_code == 0, third.output
    assert "1 cell(s) run, 2 finished earlier" in third.output
    report = json.loads((out / "cells" / "udec-k2-iid-e1-r0" / "report.json").read_text())
    assert report["evaluation"]["samples"] == 8

    # Changed settings never mix with finished cells.
    grid.write_text(TINY_GRID.replace("limit = 64", "limit = 48"))
    clash = runner.invoke(app, ["experiment", str(grid), "--out", str(out)])
    assert clash.exit_code == 2 and "was run with other settings" in clash.output


def test_a_codec_sweep_gives_cells_a_frontier_table_and_plot(tmp_path):
    from feddiffuse.shared.experiment_plots import codec_frontier
    from feddiffuse.shared.experiment_report import markdown, reference_rows

    grid = TINY_GRID.replace('local_epochs = [1]', 'local_epochs = [1]\ncodecs = ["fp32", '
                             '"topk:0.050+int8/int8"]').replace('["full", "udec"]', '["full"]')
    spec = parse_grid(grid)
    cells = [c for c in grid_cells(spec) if not c.centralised]
    assert [c.id for c in cells] == ["full-k2-iid-e1-fp32-r0",
                                     "full-k2-iid-e1-topk0.05+int8-down-int8-r0"]
    config = cell_config(spec, cells[1], tmp_path)
    assert (config.uplink_codec, config.downlink_codec) == ("topk:0.05+int8", "int8")
    with pytest.raises(UserError, match="Unknown codec 'fp16'"):
        grid_cells(parse_grid(grid.replace('"fp32", ', '"fp16", ')))

    def row(cell, method, codecs, nbytes, fd):
        return {"cell": cell, "method": method, "clients": 2, "split": "iid",
                "local_epochs": 1, "rounds": 1, "group_epochs": 1, "epochs": 1, "repeat": 0,
                "seed": 3, "protocol": "product", "images": 64, "eval_samples": 8,
                "codecs": codecs, "headline": "one model", "fd_fmnist": fd,
                "fd_fmnist_real_vs_real": 1.0, "fd_fmnist_worst_client": None,
                "total_params": 10, "total_bytes": nbytes}

    rows = [row("centralised-e1-r0", "centralised", "fp32/fp32", 0, 5.0),
            row(cells[0].id, "full", "fp32/fp32", 4_000_000, 6.0),
            row(cells[1].id, "full", "topk:0.05+int8/int8", 400_000, 7.0)]
    assert [r["cell"] for r in reference_rows(rows)] == ["centralised-e1-r0", cells[0].id]
    md = markdown(spec, rows, ["fd_fmnist"])
    assert "## Codec frontier" in md
    assert "| full | 2, iid | topk:0.05+int8/int8 | 0.40 | 0.100 | 7" in md
    assert "| 2, iid | 6" in md  # the per-method table holds the fp32 cell only
    png = codec_frontier(rows, "fd_fmnist", tmp_path / "fd-vs-bytes.png")
    assert png is not None and png.stat().st_size > 0
    assert codec_frontier(rows[:2], "fd_fmnist", tmp_path / "none.png") is None
