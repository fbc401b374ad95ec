import pytest
import torch

from feddiffuse.shared.aggregation import FedAvg, SegmentedUpdate

SEG = {"e": "encoder", "b": "bottleneck", "d": "decoder"}


def start(values=(1.0, 2.0, 3.0)):
    g = {k: torch.full((2,), v) for k, v in zip("ebd", values, strict=True)}
    agg = FedAvg()
    agg.begin(g, SEG)
    return agg, g


def upd(cid, segs, n, **deltas):
    return SegmentedUpdate(cid, segs, {k: torch.full((2,), v) for k, v in deltas.items()}, n)


def test_fedavg_by_hand_with_partial_segments():
    agg, g = start()
    # A reports encoder (+10) with 100 samples, B encoder (+40) and bottleneck (+5) with 300,
    # C only bottleneck (-3) with 100. Nobody reports the decoder.
    agg.accumulate(upd("A", ("encoder",), 100, e=10.0))
    agg.accumulate(upd("B", ("encoder", "bottleneck"), 300, e=40.0, b=5.0))
    agg.accumulate(upd("C", ("bottleneck",), 100, b=-3.0))
    new = agg.finalize()
    # encoder: 1 + (100*10 + 300*40) / 400 = 1 + 32.5
    assert torch.allclose(new["e"], torch.full((2,), 33.5))
    # bottleneck: 2 + (300*5 + 100*-3) / 400 = 2 + 3
    assert torch.allclose(new["b"], torch.full((2,), 5.0))
    # decoder: unreported, keeps its value (the very same tensor)
    assert new["d"] is g["d"]
    assert agg.reported_segments == {"encoder": 400, "bottleneck": 400}


def test_full_fedavg_is_the_sample_weighted_mean_of_models():
    torch.manual_seed(0)
    g = {"e": torch.randn(5), "b": torch.randn(5), "d": torch.randn(5)}
    locals_ = [{k: torch.randn(5) for k in g} for _ in range(3)]
    ns = [10, 30, 60]
    agg = FedAvg()
    agg.begin(g, SEG)
    for i, (loc, n) in enumerate(zip(locals_, ns, strict=True)):
        agg.accumulate(SegmentedUpdate(str(i), ("encoder", "bottleneck", "decoder"),
                                       {k: loc[k] - g[k] for k in g}, n))
    new = agg.finalize()
    for k in g:
        expected = sum(n * loc[k] for loc, n in zip(locals_, ns, strict=True)) / sum(ns)
        assert torch.allclose(new[k], expected, atol=1e-6)


def test_memory_does_not_grow_with_the_number_of_updates():
    agg, _ = start()
    for i in range(50):
        agg.accumulate(upd(str(i), ("encoder", "bottleneck", "decoder"), 1, e=1.0, b=1.0, d=1.0))
    assert len(agg._sums) == 3  # one running sum per parameter, however many clients


def test_rejects_bad_updates():
    agg, _ = start()
    with pytest.raises(ValueError):
        agg.accumulate(upd("A", ("encoder",), 0, e=1.0))
    with pytest.raises(ValueError):
        agg.accumulate(upd("A", ("encoder",), 5, e=1.0, b=1.0))
