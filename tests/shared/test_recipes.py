"""Training recipes: the paper's reproduces the earlier default bit for bit, the schedule is
one curve over the whole federation, min-SNR weights, the EMA, resume with a schedule."""

import math
from dataclasses import replace

import pytest
import torch

from feddiffuse.shared.diffusion import MIN_SNR_GAMMA, DiffusionSchedule, diffusion_loss
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.protocol import TrainingSettings
from feddiffuse.shared.recipes import (
    FAST,
    PAPER,
    get_recipe,
    recipe_from_dict,
    recipe_from_training,
    recipe_training_fields,
    update_ema,
)
from feddiffuse.shared.training import TrainConfig, train_local


def images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_paper_recipe_trains_exactly_as_the_earlier_default():
    sched = DiffusionSchedule.linear()
    old = build_unet("tiny", seed=0)  # the earlier default: Adam 1e-4, Huber, fp32
    train_local(old, images(), sched, TrainConfig(epochs=2, batch_size=16), seed=3)
    new = build_unet("tiny", seed=0)
    cfg = PAPER.train_config(epochs=2, images=40, round_index=3, rounds=5, batch_size=16)
    assert not cfg.scheduled and cfg.optimizer == "adam" and cfg.loss == "huber"
    train_local(new, images(), sched, cfg, seed=3)
    a, b = params(old), params(new)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_fast_differs_from_paper_and_is_the_default():
    assert get_recipe("fast") is FAST and FAST.keep_optimizer and FAST.lr_schedule == "cosine"
    sched = DiffusionSchedule.linear()
    a, b = build_unet("tiny", seed=0), build_unet("tiny", seed=0)
    train_local(a, images(), sched, PAPER.train_config(
        epochs=1, images=40, round_index=1, rounds=2, batch_size=16), seed=0)
    train_local(b, images(), sched, FAST.train_config(
        epochs=1, images=40, round_index=1, rounds=2, batch_size=16), seed=0)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(),
                                                     strict=True))
    with pytest.raises(UserError, match="Unknown recipe"):
        get_recipe("fastest")


def test_the_schedule_is_one_curve_over_all_rounds():
    rounds, epochs, n, batch = 4, 2, 100, 32  # 4 steps an epoch, 32 steps in all
    per_round = [FAST.train_config(epochs=epochs, images=n, round_index=r, rounds=rounds,
                                   batch_size=batch) for r in range(1, rounds + 1)]
    assert [c.step_offset for c in per_round] == [0, 8, 16, 24]
    assert {c.total_steps for c in per_round} == {32}
    cfg = replace(per_round[0], warmup_steps=4)
    lrs = [cfg.lr_at(s) for s in range(32)]
    assert lrs[:4] == pytest.approx([cfg.lr * k / 4 for k in (1, 2, 3, 4)])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # then only decays
    assert lrs[-1] == pytest.approx(cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5
                                              * (1 + math.cos(math.pi * 27 / 28))))
    assert cfg.lr_at(10_000) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_training_follows_the_schedule_step_by_step(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = FAST.train_config(epochs=1, images=40, round_index=2, rounds=3, batch_size=16)
    train_local(build_unet("tiny", seed=0), images(), DiffusionSchedule.linear(), cfg, seed=0)
    assert seen == pytest.approx([cfg.lr_at(cfg.step_offset + s) for s in range(3)])


def test_resume_mid_round_with_a_schedule_is_bit_identical():
    sched = DiffusionSchedule.linear()
    cfg = FAST.train_config(epochs=2, images=40, round_index=2, rounds=3, batch_size=16)
    full = build_unet("tiny", seed=0)
    train_local(full, images(), sched, cfg, seed=5)
    saved = {}

    def keep(report, model):
        if report.epoch == 1:
            saved["model"], saved["optim"] = params(model), report.optimizer_state()

    part = build_unet("tiny", seed=0)
    train_local(part, images(), sched, replace(cfg, epochs=1), seed=5, on_epoch=keep)
    resumed = build_unet("tiny", seed=0)
    resumed.load_state_dict(saved["model"])
    train_local(resumed, images(), sched, cfg, seed=5, start_epoch=1,
                optimizer_state=saved["optim"])
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


class _Oracle(torch.nn.Module):
    """Predicts a fixed error of 1 everywhere, so every sample's MSE is exactly 1."""

    def forward(self, x, t):
        self.t = t
        return torch.ones_like(x) + 0 * x

    def __init__(self):
        super().__init__()


def test_min_snr_weights_only_the_low_noise_steps():
    sched = DiffusionSchedule.linear()
    x0 = torch.zeros(512, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    model = _Oracle()
    weighted = diffusion_loss(model, sched, x0, gen, "mse", "min-snr")
    t = model.t
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    gen = torch.Generator().manual_seed(0)
    plain = diffusion_loss(_Oracle(), sched, x0, gen, "mse", "none")
    # MSE of (1 - noise) per sample, times min(SNR, 5) / SNR.
    gen = torch.Generator().manual_seed(0)
    torch.randint(0, sched.timesteps, (512,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    per_sample = ((1 - noise) ** 2).flatten(1).mean(1)
    expected = (per_sample * snr.clamp(max=MIN_SNR_GAMMA) / snr).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert weighted < plain  # the weights are at most 1, and below 1 where SNR > 5
    with pytest.raises(UserError, match="loss weighting"):
        diffusion_loss(_Oracle(), sched, x0, gen, "mse", "p2")


def test_ema_starts_at_the_first_state_and_then_averages():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    first = update_ema(None, a, 0.75)
    assert torch.equal(first["w"], a["w"]) and first["w"] is not a["w"]
    second = update_ema(first, b, 0.75)
    assert torch.allclose(second["w"], torch.tensor([1.5, 3.0]))
    assert torch.equal(first["w"], a["w"])  # the previous EMA is not changed in place


def test_recipes_travel_in_the_manifest_and_in_storage():
    r = replace(FAST, batch_size=32)
    settings = TrainingSettings(local_epochs=2, seed=9, **recipe_training_fields(r))
    assert recipe_from_training(settings) == r
    assert recipe_from_dict(r.to_dict()) == r
    # An older hub's manifest, which sends only epochs, batch, lr and loss, reads as the paper.
    old = TrainingSettings(local_epochs=1, batch_size=128, lr=1e-4, loss="huber")
    assert recipe_from_training(old) == replace(PAPER, batch_size=128)
    with pytest.raises(UserError):
        recipe_from_dict({"name": "x", "optimizer": "sgd"})
    with pytest.raises(UserError):
        recipe_from_dict({"name": "x", "momentum": 0.9})
