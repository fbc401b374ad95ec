"""Client-level DP-FedAvg: options, clipping, noise, the accountant, and the aggregation's
sensitivity (whole model, partial uploads, a lossy codec after the clip)."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event, rdp
from scipy.stats import chi2, kstest

from feddiffuse.shared.aggregation import DPFedAvg
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.privacy import PrivacySettings, privacy_from_options
from feddiffuse.shared.privacy.accountant import (
    budget_refusal,
    privacy_report,
    rounds_within_budget,
    spent,
)
from feddiffuse.shared.privacy.mechanism import (
    clip_update,
    l2_norm,
    os_random_normal,
    privatize_upload,
)
from feddiffuse.shared.privacy.options import check_budget
from feddiffuse.shared.rounds import RoundState

ALPHA = 1e-6  # the false-alarm rate of every statistical check below


def central(**kw) -> PrivacySettings:
    return PrivacySettings(**{"mode": "central", "clip": 1.0, "noise_multiplier": 1.1,
                              "delta": 1e-5, **kw})


def independent_epsilon(z: float, delta: float, rounds: int) -> float:
    """The accountant's figure, computed here without the product's code."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(delta)


# -- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("central", -1.0, 1.0, 1e-5, None), "--dp-clip must be a positive number"),
    (("central", 1.0, None, 1e-5, None), "needs --dp-noise-multiplier"),
    (("local", None, 1.0, 1e-5, None), "needs --dp-clip"),
    (("central", 1.0, 1.0, None, None), "needs --dp-delta"),
    (("central", 1.0, 0.0, 1e-5, None), "--dp-noise-multiplier must be a positive"),
    (("central", 1.0, 1.0, 1.5, None), "--dp-delta must be between 0 and 1"),
    (("central", 1.0, 1.0, 1e-5, -2.0), "--dp-epsilon-budget must be a positive"),
    (("shuffle", 1.0, 1.0, 1e-5, None), "Unknown --dp 'shuffle'"),
    ((None, 1.0, None, None, None), "--dp-clip need --dp central or --dp local"),
    (("central", math.inf, 1.0, 1e-5, None), "--dp-clip must be a positive number"),
])
def test_bad_options_say_what_to_fix_in_one_sentence(args, message):
    with pytest.raises(UserError, match=message) as err:
        privacy_from_options(*args)
    assert "\n" not in str(err.value)


def test_no_dp_gives_none_and_good_options_give_settings():
    assert privacy_from_options(None, None, None, None, None) is None
    p = privacy_from_options("local", 0.5, 2.0, 1e-6, 10.0)
    assert p == PrivacySettings(mode="local", clip=0.5, noise_multiplier=2.0, delta=1e-6,
                                epsilon_budget=10.0)
    assert p.noise_std == 1.0 and p.noise == "os-random" and p.accountant == "rdp"


# -- the accountant --------------------------------------------------------------------------

def test_epsilon_is_dp_accountings_rdp_figure_after_every_round():
    p = central(noise_multiplier=1.3, delta=1e-5)
    report = privacy_report(p, [1, 2, 4])  # round 3 closed with no report: nothing released
    assert [h.round for h in report.history] == [1, 2, 4]
    for i, h in enumerate(report.history):
        assert h.epsilon == pytest.approx(independent_epsilon(1.3, 1e-5, i + 1), rel=1e-12)
    assert report.epsilon == report.history[-1].epsilon
    assert report.next_round_epsilon == pytest.approx(independent_epsilon(1.3, 1e-5, 4))
    assert privacy_report(p, []).epsilon == 0.0


def test_the_budget_allows_the_rounds_whose_epsilon_fits():
    p = central(noise_multiplier=1.0, epsilon_budget=8.0)
    assert independent_epsilon(1.0, 1e-5, 2) <= 8.0 < independent_epsilon(1.0, 1e-5, 3)
    assert rounds_within_budget(p, 10) == 2 and check_budget(p, 10) == 2
    assert budget_refusal(p, 1, 2) is None
    why = budget_refusal(p, 2, 3)
    assert why is not None and "round 3 is not opened" in why and "budget of 8" in why
    with pytest.raises(UserError, match="does not allow a single round"):
        check_budget(central(epsilon_budget=spent(central(), 1) / 2), 5)


# -- clip and noise --------------------------------------------------------------------------

def test_clip_scales_the_whole_upload_and_leaves_a_short_one_alone():
    g = torch.Generator().manual_seed(0)
    big = {"a": torch.randn(300, generator=g) * 5, "b": torch.randn(40, 7, generator=g)}
    clipped, before = clip_update(big, 1.5)
    assert before == pytest.approx(l2_norm(big))
    assert l2_norm(clipped) <= 1.5
    assert l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    ratio = clipped["a"] / big["a"]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and torch.allclose(
        clipped["b"] / big["b"], ratio[0].expand_as(clipped["b"]))  # one scale for all
    small = {"a": torch.full((4,), 0.1)}
    same, _ = clip_update(small, 1.5)
    assert torch.equal(same["a"], small["a"])


def test_local_noise_has_the_declared_std_chi_square():
    """||noise||^2 / sigma^2 ~ chi2(d): outside its two-sided 1-ALPHA interval only by chance
    ALPHA (the check fails falsely once in a million runs)."""
    p = PrivacySettings(mode="local", clip=0.2, noise_multiplier=1.5, delta=1e-5)
    d = 200_000
    zero = {"w": torch.zeros(d // 2), "v": torch.zeros(d // 4, 2)}
    out = privatize_upload(zero, p)
    assert out.noise_std == pytest.approx(0.3) and not out.clipped
    stat = sum(float(t.double().pow(2).sum()) for t in out.tensors.values()) / p.noise_std ** 2
    assert chi2.ppf(ALPHA / 2, d) <= stat <= chi2.ppf(1 - ALPHA / 2, d)
    # and the noise is fresh each time: two draws differ
    again = privatize_upload(zero, p)
    assert not torch.equal(again.tensors["w"], out.tensors["w"])


def test_central_dp_client_clips_but_adds_no_noise():
    p = central(clip=0.5)
    delta = {"w": torch.ones(100)}
    out = privatize_upload(delta, p)
    assert out.noise_std == 0 and out.clipped and out.norm_before == pytest.approx(10.0)
    assert l2_norm(out.tensors) == pytest.approx(0.5, rel=1e-5)
    assert "the hub adds the noise" in out.describe(p)


def test_os_random_noise_is_standard_normal_and_never_repeats():
    """os.urandom through Box-Muller: a Kolmogorov-Smirnov test against N(0, 1) at a false
    alarm rate of ALPHA, of an odd count (the last pair's second draw dropped), and two draws
    that are unrelated."""
    a = os_random_normal((1001, 101))
    assert a.shape == (1001, 101) and a.dtype == torch.float32
    assert kstest(a.double().flatten().numpy(), "norm").pvalue > ALPHA
    b = os_random_normal((1001, 101))
    # Equal float32 values at one index happen by chance (~2e-8 each), not for ~1 % of them.
    assert int((a == b).sum()) < 1000
    assert torch.isfinite(a).all()


# -- the aggregation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_state():
    model = build_unet("tiny", seed=0)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return state, segment_map(model)


def seeded(seed: int):
    """A fixed generator, for checking the aggregation's arithmetic (the product draws its
    noise from os_random_normal)."""
    return lambda: torch.Generator().manual_seed(seed)


def aggregate(method, state, seg_of, updates, privacy, seed=5, ids=("a", "b", "c")):
    rs = RoundState.open(method, 1, list(ids), state, seg_of, seed=3,
                         strategy=DPFedAvg(privacy, generator=seeded(seed)))
    for cid in sorted(updates):
        rs.accept(cid, updates[cid], 1000 if cid == "a" else 1, 1)
    return rs, rs.finalize()


def random_update(rs, cid, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) * scale
            for n, shape in rs.expected_upload_shapes(cid).items()}


def contribution(state, seg_of, with_a, without_a, counts):
    """The change of the vector of all segment sums between two neighbouring rounds."""
    total = 0.0
    for name in state:
        n = counts.get(seg_of[name], 0)
        if n:
            total += float(((with_a[name] - without_a[name]).double() * n).pow(2).sum())
    return math.sqrt(total)


@pytest.mark.parametrize("method", ["full", "usplit", "udec"])
def test_one_client_moves_the_segment_sums_by_at_most_the_clip(model_state, method):
    """Zero-out neighbours: client a's update (huge, whatever segments it uploads) against a
    zero update. Same noise in both (same generator), so the difference is a's clipped
    contribution, whose norm over all the segments it uploaded together is <= C."""
    state, seg_of = model_state
    p = central(clip=0.7, noise_multiplier=0.5)
    probe = RoundState.open(method, 1, ["a", "b", "c"], state, seg_of, seed=3)
    updates = {c: random_update(probe, c, 3.0 if c == "a" else 1e-4, i)
               for i, c in enumerate("abc")}
    zeroed = {**updates, "a": {n: torch.zeros_like(t) for n, t in updates["a"].items()}}
    rs, with_a = aggregate(method, state, seg_of, updates, p)
    _, without_a = aggregate(method, state, seg_of, zeroed, p)
    counts = rs.strategy.reported_segments
    moved = contribution(state, seg_of, with_a.global_state, without_a.global_state, counts)
    assert moved <= 0.7 * (1 + 1e-4)
    assert moved == pytest.approx(0.7, rel=1e-3)  # a's 3.0-scale update was clipped to C
    if method == "udec":  # a udec client uploads its decoder only: nothing else moves
        assert set(counts) == {"decoder"}
        for name, value in state.items():
            if seg_of[name] != "decoder":
                assert torch.equal(with_a.global_state[name], value)


def test_central_noise_is_std_z_c_on_the_sum_and_weights_are_uniform(model_state):
    state, seg_of = model_state
    p = central(clip=1.0, noise_multiplier=2.0)
    zero = {c: {n: torch.zeros_like(t) for n, t in state.items()} for c in "ab"}
    rs, out = aggregate("full", state, seg_of, zero, p, ids=("a", "b"))
    assert rs.strategy.reported_segments == {"encoder": 2, "bottleneck": 2, "decoder": 2}
    assert rs.strategy.noise_added
    gen = seeded(5)()
    for name, value in state.items():  # (sum 0 + N(0, (ZC)^2)) / 2, in this very order
        expected = torch.randn(tuple(value.shape), generator=gen) * 2.0 / 2 + value
        assert torch.allclose(out.global_state[name], expected, atol=1e-6)
    # uniform weights: a's sample count (1000 vs 1) does not change the mean
    ones = {c: {n: torch.full_like(t, 1e-4 if c == "a" else 3e-4) for n, t in state.items()}
            for c in "ab"}
    _, mean = aggregate("full", state, seg_of, ones, p, ids=("a", "b"))
    name = next(iter(state))
    noise_only = out.global_state[name] - state[name]
    assert torch.allclose(mean.global_state[name] - state[name] - noise_only,
                          torch.full_like(state[name], 2e-4), atol=1e-6)


def test_local_dp_hub_takes_the_uniform_mean_without_clipping_or_noise(model_state):
    state, seg_of = model_state
    p = PrivacySettings(mode="local", clip=0.01, noise_multiplier=1.0, delta=1e-5)
    noised = {c: {n: torch.full_like(t, v) for n, t in state.items()}
              for c, v in (("a", 1.0), ("b", 3.0))}
    rs, out = aggregate("full", state, seg_of, noised, p, ids=("a", "b"))
    assert not rs.strategy.noise_added
    for name, value in state.items():
        assert torch.allclose(out.global_state[name], value + 2.0)


def test_hub_clip_bounds_what_a_lossy_codec_decodes(model_state):
    """Clip before compression; int8 rounding (a stand-in for a lossy codec) can make the
    decoded update a little longer than C, and the hub's clip after decoding restores the
    bound, so the sensitivity stays C."""
    state, seg_of = model_state
    p = central(clip=0.5, noise_multiplier=1.0)
    probe = RoundState.open("full", 1, ["a", "b"], state, seg_of, seed=3)
    raw = random_update(probe, "a", 1.0, 7)
    clipped, _ = clip_update(raw, p.clip)

    def int8_roundtrip(t):
        scale = t.abs().max() / 127
        return torch.round(t / scale).clamp(-127, 127) * scale

    decoded = {n: int8_roundtrip(t) for n, t in clipped.items()}
    assert l2_norm(decoded) > p.clip  # the codec's error lengthened it
    zero = {n: torch.zeros_like(t) for n, t in decoded.items()}
    rs, with_a = aggregate("full", state, seg_of, {"a": decoded, "b": zero}, p, ids=("a", "b"))
    _, without = aggregate("full", state, seg_of, {"a": zero, "b": zero}, p, ids=("a", "b"))
    moved = contribution(state, seg_of, with_a.global_state, without.global_state,
                         rs.strategy.reported_segments)
    assert moved <= p.clip * (1 + 1e-4)
