import math

import pytest
import torch

from feddiffuse.shared.diffusion import (
    DiffusionSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    diffusion_loss,
    make_generator,
    sample,
)
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet


def test_linear_schedule_matches_ho_et_al():
    s = DiffusionSchedule.linear()
    assert s.timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    diffs = s.betas[1:] - s.betas[:-1]
    assert torch.allclose(diffs, torch.full_like(diffs, (0.02 - 1e-4) / 999), atol=1e-9)
    expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-4)
    assert torch.all(s.posterior_variance[1:] > 0)
    assert s.posterior_variance[0].item() == 0.0


def test_q_sample_is_the_closed_form():
    s = DiffusionSchedule.linear()
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.full_like(x0, 2.0)
    t = torch.tensor([0, 999])
    xt = s.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):
        a = s.alphas_cumprod[step]
        assert torch.allclose(xt[i], a.sqrt() * 1 + (1 - a).sqrt() * 2)


class _Oracle(torch.nn.Module):
    """Returns a fixed eps; enough to check loss maths and sampler plumbing."""

    def __init__(self, channels=1, size=4):
        super().__init__()
        from feddiffuse.shared.model import UNetConfig

        self.config = UNetConfig(image_size=size, channels=channels, dim=16)
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t[0].item())
        return torch.zeros_like(x)


def test_loss_is_huber_by_default_and_mse_on_request():
    s = DiffusionSchedule.linear()
    x0 = torch.zeros(64, 1, 4, 4)
    # eps_hat = 0, so Huber = mean(smooth_l1(0, noise)), MSE = mean(noise^2).
    huber = diffusion_loss(_Oracle(), s, x0, make_generator(0)).item()
    mse = diffusion_loss(_Oracle(), s, x0, make_generator(0), loss="mse").item()
    noise = torch.randn((64, 1, 4, 4), generator=_after_randint(64))
    assert mse == pytest.approx(noise.square().mean().item(), rel=1e-5)
    assert huber == pytest.approx(torch.nn.functional.smooth_l1_loss(
        torch.zeros_like(noise), noise).item(), rel=1e-5)
    with pytest.raises(UserError):
        diffusion_loss(_Oracle(), s, x0, make_generator(0), loss="l1")


def _after_randint(n):
    g = make_generator(0)
    torch.randint(0, 1000, (n,), generator=g)
    return g


def test_ddim_timesteps_are_evenly_spaced_and_end_at_zero():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert ts == sorted(ts, reverse=True)
    with pytest.raises(UserError):
        ddim_timesteps(1000, 0)


def test_ddpm_runs_every_step_in_reverse():
    model = _Oracle()
    s = DiffusionSchedule.linear(timesteps=20)
    out = ddpm_sample(model, s, (2, 1, 4, 4), make_generator(0))
    assert model.calls == list(range(19, -1, -1))
    assert out.shape == (2, 1, 4, 4) and out.abs().max() <= 1


def test_deterministic_ddim_with_zero_eps_returns_the_clipped_start_scaled():
    # With eps_hat = 0, x0_hat = x_T / sqrt(abar_T) clipped, and eta = 0 lands on x0_hat.
    model = _Oracle()
    s = DiffusionSchedule.linear()
    g = make_generator(3)
    out = ddim_sample(model, s, (1, 1, 4, 4), g, steps=10, eta=0.0)
    xT = torch.randn((1, 1, 4, 4), generator=make_generator(3))
    assert torch.allclose(out, (xT / s.alphas_cumprod[999].sqrt()).clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_are_reproducible_from_a_seed(sampler):
    model = build_unet("tiny", seed=0)
    s = DiffusionSchedule.linear(timesteps=30)
    kw = {"sampler": sampler, "steps": 5, "batch_size": 2}
    a = sample(model, s, 3, make_generator(11), **kw)
    b = sample(model, s, 3, make_generator(11), **kw)
    c = sample(model, s, 3, make_generator(12), **kw)
    assert a.shape == (3, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_eta_adds_noise():
    model = build_unet("tiny", seed=0)
    s = DiffusionSchedule.linear()
    a = sample(model, s, 2, make_generator(1), steps=4, eta=0.0)
    b = sample(model, s, 2, make_generator(1), steps=4, eta=1.0)
    assert not torch.equal(a, b)


class _GaussianOracle(torch.nn.Module):
    """The exact noise predictor E[eps | x_t] for data x0 ~ N(mu, s^2) per pixel."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t):
        a = self.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


@pytest.mark.parametrize(("sampler", "kwargs"), [
    ("ddpm", {}),
    ("ddim", {"steps": 1000, "eta": 0.0}),
    ("ddim", {"steps": 1000, "eta": 1.0}),
])
def test_samplers_recover_the_data_distribution_with_an_exact_model(sampler, kwargs):
    s = DiffusionSchedule.linear()
    mu, sd = 0.2, 0.15
    model = _GaussianOracle(s, mu, sd)
    shape = (2048, 1, 2, 2)
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample
    x = fn(model, s, shape, make_generator(0), **kwargs)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(sd, rel=0.06)


def test_ddim_error_shrinks_as_steps_grow():
    # Few DDIM steps under-disperse low-variance data; the error must fall with more steps.
    s = DiffusionSchedule.linear()
    model = _GaussianOracle(s, 0.2, 0.15)
    stds = [ddim_sample(model, s, (2048, 1, 2, 2), make_generator(0), steps=n).std().item()
            for n in (10, 50, 200)]
    assert stds[0] < stds[1] < stds[2] < 0.15 * 1.03


def test_ddpm_over_all_steps_is_the_plain_chain_whatever_the_steps_argument():
    model = build_unet("tiny", seed=0)
    s = DiffusionSchedule.linear(timesteps=20)
    plain = ddpm_sample(model, s, (2, 1, 28, 28), make_generator(5))
    assert torch.equal(plain, ddpm_sample(model, s, (2, 1, 28, 28), make_generator(5),
                                          steps=20))
    assert torch.equal(plain, sample(model, s, 2, make_generator(5), "ddpm", steps=20,
                                     batch_size=2))


def test_respaced_ddpm_visits_the_chosen_steps_and_recovers_the_data():
    counted = _Oracle()
    ddpm_sample(counted, DiffusionSchedule.linear(timesteps=20), (1, 1, 4, 4),
                make_generator(0), steps=5)
    assert counted.calls == [19, 14, 10, 5, 0]
    # With the posterior variance, few steps under-disperse: the spread nears the data's
    # (and the full chain's) as the steps grow; the mean is right throughout.
    s = DiffusionSchedule.linear()
    model = _GaussianOracle(s, 0.2, 0.15)
    runs = [ddpm_sample(model, s, (2048, 1, 2, 2), make_generator(0), steps=n)
            for n in (50, 250, 999)]
    assert all(x.mean().item() == pytest.approx(0.2, abs=0.01) for x in runs)
    stds = [x.std().item() for x in runs]
    full = ddpm_sample(model, s, (2048, 1, 2, 2), make_generator(0)).std().item()
    assert stds[0] < stds[1] < stds[2] and stds[2] == pytest.approx(full, rel=0.01)


def test_x0_clipping_is_a_choice_of_both_samplers():
    # An untrained UNet predicts noise whose x0 leaves [-1, 1], so clipping changes the images;
    # the defaults are what they were: DDIM clips, DDPM does not.
    model = build_unet("tiny", seed=0)
    s = DiffusionSchedule.linear(timesteps=20)
    for sampler, default_clips in (("ddim", True), ("ddpm", False)):
        kw = {"steps": 5 if sampler == "ddim" else 20, "batch_size": 2}
        default = sample(model, s, 2, make_generator(1), sampler, **kw)
        same = sample(model, s, 2, make_generator(1), sampler, clip_x0=default_clips, **kw)
        other = sample(model, s, 2, make_generator(1), sampler, clip_x0=not default_clips, **kw)
        assert torch.equal(default, same), sampler
        assert not torch.equal(default, other), sampler


def test_a_sampler_spec_says_what_it_does_and_refuses_bad_settings():
    from feddiffuse.shared.diffusion import SamplerSpec

    assert SamplerSpec().describe() == "DDIM 50 steps, x0 clipped"
    assert SamplerSpec("ddpm", 1000).describe() == "DDPM 1000 steps, no x0 clipping"
    assert SamplerSpec("ddpm", 1000, True).clips and not SamplerSpec("ddim", 5, False).clips
    with pytest.raises(UserError, match="Unknown sampler 'plms'"):
        SamplerSpec("plms").validate()
    with pytest.raises(UserError, match="between 1 and 1000"):
        SamplerSpec("ddpm", 0).validate()
