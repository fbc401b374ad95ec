import json

import pytest
import torch
from typer.testing import CliRunner

from feddiffuse.shared.cli import app
from feddiffuse.shared.comm import replay_ledger
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.rounds import RoundError, RoundState

PAPER_TOTALS = {  # paper.md section 3, paper-fmnist, R = 15
    2: {"full": 179_778_900, "usplit": 134_834_175, "ulatdec": 105_501_664,
        "udec": 47_537_856},
    10: {"full": 898_894_500, "usplit": 674_170_875, "ulatdec": 527_508_320,
         "udec": 237_689_280},
}


@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_comm_cli_reproduces_the_paper_totals(k, method):
    res = CliRunner().invoke(app, ["comm", "--preset", "paper-fmnist", "--method", method,
                                   "--clients", str(k), "--rounds", "15", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["total_params"] == PAPER_TOTALS[k][method]
    # fp32: 4 bytes per parameter plus one safetensors header per transfer.
    transfers = k * 15 * 2
    header = data["total_bytes"] - 4 * data["total_params"]
    assert 0 < header < transfers * 60_000


def test_udec_saves_up_to_74_percent():
    full = replay_ledger("paper-fmnist", "full", 10, 15).totals()["total_params"]
    udec = replay_ledger("paper-fmnist", "udec", 10, 15).totals()["total_params"]
    assert 1 - udec / full == pytest.approx(0.736, abs=0.001)


def test_ledger_counts_initial_broadcast_and_r_minus_1_downlinks():
    model = build_unet("paper-fmnist")
    total = sum(p.numel() for p in model.parameters())
    ledger = replay_ledger("paper-fmnist", "udec", 3, 4)
    per_client = ledger.per_client()
    assert len(per_client) == 3
    down = [t for t in ledger.transfers if t.direction == "downlink" and t.client_id == "client-00"]
    assert [t.params for t in down] == [total, 716_297, 716_297, 716_297]
    up = [t for t in ledger.transfers if t.direction == "uplink" and t.client_id == "client-00"]
    assert [t.params for t in up] == [716_297] * 4
    assert all(t.bytes > 4 * t.params for t in ledger.transfers)


def _round(method="usplit", k=3, r=1):
    model = build_unet("tiny", seed=0)
    g = {n: p.detach().clone() for n, p in model.named_parameters()}
    return RoundState.open(method, r, [f"c{i}" for i in range(k)], g, segment_map(model), 0), g


def test_round_accepts_only_assigned_segments_once():
    state, g = _round()
    cid = "c0"
    shapes = state.expected_upload_shapes(cid)
    zeros = {n: torch.zeros(s) for n, s in shapes.items()}
    wrong = {n: torch.zeros(g[n].shape) for n in g}  # the whole model
    if set(wrong) != set(shapes):
        with pytest.raises(RoundError, match="assigned segments"):
            state.accept(cid, wrong, 10, 100)
    with pytest.raises(RoundError, match="positive sample count"):
        state.accept(cid, zeros, 0, 100)
    with pytest.raises(RoundError, match="not a participant"):
        state.accept("intruder", zeros, 10, 100)
    state.accept(cid, zeros, 10, 100)
    with pytest.raises(RoundError, match="already reported"):
        state.accept(cid, zeros, 10, 100)
    assert state.missing == ["c1", "c2"] and not state.complete


def test_round_finalize_applies_the_mean_delta_and_closes():
    state, g = _round("full", k=2)
    for cid, n, v in (("c0", 1, 1.0), ("c1", 3, 5.0)):
        state.accept(cid, {n_: torch.full(s, v) for n_, s in
                           state.expected_upload_shapes(cid).items()}, n, 10)
    res = state.finalize()
    name = next(iter(g))
    assert torch.allclose(res.global_state[name], g[name] + 4.0)
    assert res.missing == [] and res.participants == ["c0", "c1"]
    with pytest.raises(RoundError, match="closed"):
        state.accept("c0", {}, 1, 1)


def test_comm_with_codecs_reports_bytes_against_full_fp32():
    res = CliRunner().invoke(app, ["comm", "--preset", "tiny", "--clients", "2", "--rounds",
                                   "3", "--uplink-codec", "topk:0.01+int8", "--downlink-codec",
                                   "topk:0.05+int8", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["uplink_codec"] == "topk:0.01+int8"
    assert data["total_params"] == replay_ledger("tiny", "full", 2, 3).totals()["total_params"]
    assert data["bytes_vs_full_fp32"] == data["total_bytes"] / data["full_fp32_total_bytes"]
    assert data["bytes_vs_full_fp32"] < 0.15  # 3 rounds: the int8 initial model dominates
    res = CliRunner().invoke(app, ["comm", "--preset", "tiny", "--uplink-codec", "fp16"])
    assert res.exit_code == 2 and "Unknown codec 'fp16'" in res.output
