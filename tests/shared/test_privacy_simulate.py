"""`feddiffuse simulate --dp` and `experiment --dp`: epsilon in report.json, budget refused
up front."""

import json

import pytest
from dp_accounting import dp_event, rdp
from typer.testing import CliRunner

from feddiffuse.shared.cli import app

ARGS = ["simulate", "--preset", "tiny", "--dataset", "fashion-mnist", "--clients", "2",
        "--limit", "32", "--batch-size", "16", "--local-epochs", "1", "--samples", "0",
        "--seed", "2"]
DP = ["--dp-clip", "0.5", "--dp-noise-multiplier", "1.2", "--dp-delta", "1e-5"]


def epsilon(z: float, rounds: int) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(1e-5)


@pytest.mark.requires_fmnist
@pytest.mark.parametrize(("mode", "method"), [("central", "udec")])  # local: tests/e2e
def test_simulate_with_dp_reports_epsilon_per_round(tmp_path, mode, method):
    out = tmp_path / mode
    res = CliRunner().invoke(app, [*ARGS, "--method", method, "--rounds", "2", "--out",
                                   str(out), "--dp", mode, *DP])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["settings"]["mode"] == mode and privacy["settings"]["noise"] == "os-random"
    assert [h["round"] for h in privacy["history"]] == [1, 2]
    for h in privacy["history"]:
        assert h["epsilon"] == pytest.approx(epsilon(1.2, h["round"]), rel=1e-9)
    for line in report["rounds"]:
        assert line["privacy"]["noise"] == "os-random"
        assert line["privacy"]["noise_added_by"] == ("hub" if mode == "central" else "clients")
    assert f"epsilon {epsilon(1.2, 2):.4g} ({mode} DP)" in res.output
    assert report["config"]["dp"] == mode


def test_simulate_refuses_rounds_past_the_budget_before_training(tmp_path):
    res = CliRunner().invoke(app, [*ARGS, "--rounds", "3", "--out", str(tmp_path / "x"),
                                   "--dp", "central", "--dp-clip", "0.5",
                                   "--dp-noise-multiplier", "1", "--dp-delta", "1e-5",
                                   "--dp-epsilon-budget", "8"])
    assert res.exit_code == 2
    assert "--rounds 3 would spend more than the epsilon budget 8, which allows 2" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--dp", "central", "--dp-clip", "1", "--dp-delta", "1e-5"], "needs --dp-noise-multiplier"),
    (["--dp", "local", "--dp-clip", "-1", "--dp-noise-multiplier", "1", "--dp-delta", "1e-5"],
     "--dp-clip must be a positive number"),
])
def test_bad_dp_options_are_one_line_errors(tmp_path, extra, message):
    res = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path / "x"), *extra])
    assert res.exit_code == 2 and message in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_experiment_takes_the_dp_options(tmp_path):
    res = CliRunner().invoke(app, ["experiment", "cpu-small", "--out", str(tmp_path / "g"),
                                   "--dry-run", "--dp", "local", *DP])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(app, ["experiment", "cpu-small", "--out", str(tmp_path / "g"),
                                   "--dry-run", "--dp", "local", "--dp-clip", "1"])
    assert bad.exit_code == 2 and "needs --dp-noise-multiplier" in bad.output


def test_a_cell_finished_before_the_dp_settings_existed_still_counts_as_finished(tmp_path):
    from dataclasses import asdict

    from feddiffuse.shared.experiment import finished_report
    from feddiffuse.shared.simulate import SimulationConfig

    config = SimulationConfig(out=str(tmp_path / "cell"))
    old = {k: v for k, v in asdict(config).items() if not k.startswith("dp")}
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "report.json").write_text(json.dumps({"config": old}))
    assert finished_report(config) == {"config": old}
    private = SimulationConfig(out=str(tmp_path / "cell"), dp="central", dp_clip=1.0,
                               dp_noise_multiplier=1.0, dp_delta=1e-5)
    with pytest.raises(Exception, match="was run with other settings"):
        finished_report(private)
