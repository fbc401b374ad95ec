"""Gaussian diffusion: the noise schedule, the training loss, and two samplers.

- Forward process and ancestral sampler: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic
  Models" (2020), Algorithms 1 and 2, with the posterior variance beta-tilde.
- Deterministic / stochastic fast sampler: Song, Meng, Ermon, "Denoising Diffusion Implicit
  Models" (2021), equation 12, with eta selecting the amount of noise (eta = 1 ~ DDPM).

The schedule is a plain object of tensors, not an nn.Module, so it can never end up in a
state_dict or on the wire. Every random draw takes an explicit `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError
from .recipes import LOSS_WEIGHTINGS, LOSSES


def linear_beta_schedule(timesteps: int = 1000, start: float = 1e-4, end: float = 0.02):
    """Linear betas of Ho et al. (2020), section 4: 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed` (random draws must live on that device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


@dataclass
class DiffusionSchedule:
    """Precomputed schedule quantities, float32, on one device."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor
    posterior_variance: torch.Tensor

    @property
    def timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               device: torch.device | str = "cpu") -> DiffusionSchedule:
        betas = linear_beta_schedule(timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat((torch.ones(1, dtype=ac.dtype), ac[:-1]))
        posterior_var = betas * (1.0 - ac_prev) / (1.0 - ac)

        def f(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=torch.float32)

        return cls(
            betas=f(betas),
            alphas_cumprod=f(ac),
            alphas_cumprod_prev=f(ac_prev),
            sqrt_alphas_cumprod=f(ac.sqrt()),
            sqrt_one_minus_alphas_cumprod=f((1.0 - ac).sqrt()),
            sqrt_recip_alphas=f(alphas.rsqrt()),
            posterior_variance=f(posterior_var),
        )

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        return DiffusionSchedule(**{k: v.to(device) for k, v in self.__dict__.items()})

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) with the given noise."""
        a = _gather(self.sqrt_alphas_cumprod, t, x0.ndim)
        s = _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return a * x0 + s * noise


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


MIN_SNR_GAMMA = 5.0


def diffusion_loss(model: nn.Module, schedule: DiffusionSchedule, x0: torch.Tensor,
                   generator: torch.Generator, loss: str = "huber",
                   weighting: str = "none") -> torch.Tensor:
    """Noise-prediction loss with t uniform per sample (Ho et al. 2020, Algorithm 1).

    loss = "huber" (smooth L1, the paper's choice) or "mse" (Ho et al.'s simple loss).
    weighting = "none" (the plain mean) or "min-snr": each sample's loss is scaled by
    min(SNR(t), 5) / SNR(t) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting"), which stops the nearly noise-free steps from dominating the gradient.
    """
    if loss not in LOSSES:
        raise UserError(f"Unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}.")
    if weighting not in LOSS_WEIGHTINGS:
        raise UserError(f"Unknown loss weighting {weighting!r}; choose one of: "
                        f"{', '.join(LOSS_WEIGHTINGS)}.")
    b = x0.shape[0]
    t = torch.randint(0, schedule.timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    predicted = model(x_t, t)
    if weighting == "none":
        if loss == "huber":
            return F.smooth_l1_loss(predicted.float(), noise.float())
        return F.mse_loss(predicted.float(), noise.float())
    fn = F.smooth_l1_loss if loss == "huber" else F.mse_loss
    per_sample = fn(predicted.float(), noise.float(), reduction="none").flatten(1).mean(1)
    ac = schedule.alphas_cumprod.gather(0, t)
    snr = ac / (1.0 - ac)
    weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
    return (per_sample * weight).mean()


StepCallback = Callable[[int, int], None]


def sampler_timesteps(total: int, steps: int, what: str = "Sampling") -> list[int]:
    """`steps` timesteps evenly spread over [0, total - 1], descending, always ending at 0."""
    if not 1 <= steps <= total:
        raise UserError(f"{what} steps must be between 1 and {total}, got {steps}.")
    ts = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(ts), reverse=True)


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spread over [0, total - 1], descending, always ending at 0."""
    return sampler_timesteps(total, steps, "DDIM")


def _predicted_x0(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, clip: bool
                  ) -> torch.Tensor:
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return x0.clamp(-1.0, 1.0) if clip else x0


@torch.inference_mode()
def ddpm_sample(model: nn.Module, schedule: DiffusionSchedule, shape: tuple[int, ...],
                generator: torch.Generator, device: torch.device | str = "cpu",
                on_step: StepCallback | None = None, steps: int | None = None,
                clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2). Returns [-1, 1].

    Over all T steps by default, as the paper sampled. ``steps`` < T respaces the chain onto
    evenly spread timesteps (Nichol & Dhariwal 2021, section 4: betas recomputed from the kept
    steps' alpha-bars), a cheap stand-in for smoke runs; at T it is the plain chain.
    ``clip_x0`` clips the predicted x_0 to [-1, 1] and takes the posterior mean from it (the
    paper did not); without it the mean comes from the predicted noise, eps form.
    """
    device = torch.device(device)
    total = schedule.timesteps
    seq = list(reversed(range(total))) if steps in (None, total) else \
        sampler_timesteps(total, int(steps), "DDPM")
    full = len(seq) == total
    x = torch.randn(shape, generator=generator, device=device)
    one = torch.ones((), device=device)
    for i, step in enumerate(seq):
        prev = seq[i + 1] if i + 1 < len(seq) else -1
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        eps = model(x, t).float()
        a_t = schedule.alphas_cumprod[step]
        if full:  # the stored schedule itself, so that T steps are the plain chain exactly
            beta, a_prev = schedule.betas[step], schedule.alphas_cumprod_prev[step]
            variance = schedule.posterior_variance[step]
        else:
            a_prev = schedule.alphas_cumprod[prev] if prev >= 0 else one
            beta = 1 - a_t / a_prev
            variance = beta * (1 - a_prev) / (1 - a_t)
        if clip_x0:
            x0 = _predicted_x0(x, eps, a_t, True)
            mean = (beta * a_prev.sqrt() / (1 - a_t)) * x0 + \
                ((1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)) * x
        elif full:
            mean = schedule.sqrt_recip_alphas[step] * (
                x - schedule.betas[step] / schedule.sqrt_one_minus_alphas_cumprod[step] * eps
            )
        else:
            mean = (x - beta / (1 - a_t).sqrt() * eps) / (1 - beta).sqrt()
        if prev >= 0:
            z = torch.randn(shape, generator=generator, device=device)
            x = mean + variance.sqrt() * z
        else:
            x = mean
        if on_step is not None:
            on_step(i + 1, len(seq))
    return x.clamp(-1.0, 1.0)


@torch.inference_mode()
def ddim_sample(model: nn.Module, schedule: DiffusionSchedule, shape: tuple[int, ...],
                generator: torch.Generator, steps: int = 50, eta: float = 0.0,
                device: torch.device | str = "cpu",
                on_step: StepCallback | None = None, clip_x0: bool = True) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over `steps` steps. Returns [-1, 1].

    With ``clip_x0`` (the default, as is usual for image data) the predicted x_0 is clipped to
    [-1, 1] at every step and the noise recomputed from it.
    """
    if eta < 0:
        raise UserError("DDIM eta must be >= 0.")
    device = torch.device(device)
    seq = ddim_timesteps(schedule.timesteps, steps)
    x = torch.randn(shape, generator=generator, device=device)
    for i, step in enumerate(seq):
        prev = seq[i + 1] if i + 1 < len(seq) else -1
        a_t = schedule.alphas_cumprod[step]
        a_prev = schedule.alphas_cumprod[prev] if prev >= 0 else torch.ones((), device=device)
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        eps = model(x, t).float()
        x0 = _predicted_x0(x, eps, a_t, clip_x0)
        if clip_x0:  # recompute eps from the clipped x0 so the update stays on the trajectory
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = a_prev.sqrt() * x0 + direction
        if eta > 0 and prev >= 0:
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
        if on_step is not None:
            on_step(i + 1, len(seq))
    return x.clamp(-1.0, 1.0)


SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplerSpec:
    """How images are drawn from a model: the sampler, its steps, and x_0 clipping.

    ``clip_x0`` None means the sampler's usual choice: clipped for DDIM, not for DDPM.
    """

    name: str = "ddim"
    steps: int = 50
    clip_x0: bool | None = None
    eta: float = 0.0

    def validate(self, timesteps: int = 1000) -> SamplerSpec:
        if self.name not in SAMPLERS:
            raise UserError(f"Unknown sampler {self.name!r}; choose one of: "
                            f"{', '.join(SAMPLERS)}.")
        if not 1 <= self.steps <= timesteps:
            raise UserError(f"--steps must be between 1 and {timesteps} (the diffusion's "
                            f"T), got {self.steps}.")
        return self

    @property
    def clips(self) -> bool:
        return self.name == "ddim" if self.clip_x0 is None else bool(self.clip_x0)

    def describe(self) -> str:
        return (f"{'DDIM' if self.name == 'ddim' else 'DDPM'} {self.steps} steps, "
                f"{'x0 clipped' if self.clips else 'no x0 clipping'}")

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "clip_x0": self.clips,
                "eta": self.eta if self.name == "ddim" else None}


def sample(model: nn.Module, schedule: DiffusionSchedule, n: int, generator: torch.Generator,
           sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           device: torch.device | str = "cpu", batch_size: int = 256,
           on_step: StepCallback | None = None, clip_x0: bool | None = None) -> torch.Tensor:
    """Sample `n` images from `model` (on `device`) in batches; returns float [-1, 1] on CPU.

    ``sampler`` "ddim" (``steps`` steps, x_0 clipped unless ``clip_x0`` is False) or "ddpm"
    (ancestral; all T steps when ``steps`` is T, respaced otherwise; no clipping unless
    ``clip_x0`` is True).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
    clip = (sampler == "ddim") if clip_x0 is None else bool(clip_x0)
    cfg = model.config  # type: ignore[attr-defined]
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            shape = (b, cfg.channels, cfg.image_size, cfg.image_size)
            if sampler == "ddim":
                x = ddim_sample(model, schedule, shape, generator, steps, eta, device, on_step,
                                clip_x0=clip)
            else:
                x = ddpm_sample(model, schedule, shape, generator, device, on_step,
                                steps=steps, clip_x0=clip)
            out.append(x.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
