"""The two steps of the Gaussian mechanism on a client's update: clip, then noise.

`clip_update` scales a whole upload (every tensor of every uploaded segment, as one vector)
to L2 norm at most C; `add_gaussian_noise` adds N(0, std^2) to every coordinate, drawn from
`os_random_generator()`: a torch.Generator seeded from the operating system's randomness
(`secrets.randbits`), never from the federation's seed, so nobody can replay the noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .settings import NOISE_SOURCE, PrivacySettings

Tensors = dict[str, torch.Tensor]


def os_random_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for privacy noise, seeded from `secrets.randbits` (63 bits)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all the tensors together, as one vector (in float64)."""
    total = 0.0
    for t in tensors.values():
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip_update(tensors: Mapping[str, torch.Tensor], clip: float) -> tuple[Tensors, float]:
    """`tensors` scaled by min(1, clip / norm) (float32 copies); returns them and the norm
    before clipping."""
    norm = l2_norm(tensors)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    # A hair below 1 so that float32 rounding cannot leave the result just above `clip`.
    scale = scale * (1 - 1e-6) if scale < 1.0 else scale
    return {n: t.detach().to(torch.float32).mul(scale) for n, t in tensors.items()}, norm


def add_gaussian_noise(tensors: Mapping[str, torch.Tensor], std: float,
                       generator: torch.Generator) -> Tensors:
    """Each tensor plus N(0, std^2) noise on every coordinate (float32)."""
    out: Tensors = {}
    for name, t in tensors.items():
        noise = torch.randn(tuple(t.shape), generator=generator, dtype=torch.float32,
                            device=generator.device)
        out[name] = t.detach().to(torch.float32) + noise.mul_(std).to(t.device)
    return out


@dataclass(frozen=True)
class PrivatizedUpload:
    """A client's upload after the privacy steps, and what they did (for its logs)."""

    tensors: Tensors
    norm_before: float  # the raw delta's L2 norm
    clipped: bool
    noise_std: float  # 0: no noise added here (central DP: the hub adds it)

    def describe(self, settings: PrivacySettings) -> str:
        what = (f"clipped to L2 norm {settings.clip:g} (it was {self.norm_before:.4g})"
                if self.clipped else
                f"within the clip {settings.clip:g} (L2 norm {self.norm_before:.4g})")
        noise = (f"; Gaussian noise of std {self.noise_std:g} added here (noise: "
                 f"{NOISE_SOURCE})" if self.noise_std else "; the hub adds the noise")
        return f"{settings.mode} DP: update {what}{noise}"


def privatize_upload(delta: Mapping[str, torch.Tensor], settings: PrivacySettings,
                     generator: torch.Generator | None = None) -> PrivatizedUpload:
    """A client's side of DP-FedAvg, before any encoding or compression: clip the whole
    upload to `settings.clip`; under local DP also add the noise (std Z x C) to it."""
    clipped, norm = clip_update(delta, settings.clip)
    if settings.mode != "local":
        return PrivatizedUpload(clipped, norm, norm > settings.clip, 0.0)
    noised = add_gaussian_noise(clipped, settings.noise_std,
                                generator if generator is not None else os_random_generator())
    return PrivatizedUpload(noised, norm, norm > settings.clip, settings.noise_std)
