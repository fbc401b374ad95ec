"""The two steps of the Gaussian mechanism on a client's update: clip, then noise.

`clip_update` scales a whole upload (every tensor of every uploaded segment, as one vector)
to L2 norm at most C; `add_gaussian_noise` adds N(0, std^2) to every coordinate, drawn by
`os_random_normal`: every draw made from fresh bytes of the operating system's cryptographic
random source (`os.urandom`) by the Box-Muller transform, never from the federation's seed nor
from a pseudo-random generator's state, so nobody can replay or predict the noise.
(Written here rather than taken from a library: torch and numpy only offer seeded PRNGs.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .settings import NOISE_SOURCE, PrivacySettings

Tensors = dict[str, torch.Tensor]


def os_random_normal(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 draws of `shape`, from `os.urandom` alone: pairs of uniforms of
    53 bits each (u1 in (0, 1], u2 in [0, 1)) through the Box-Muller transform in float64."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
    bits = torch.bitwise_right_shift(raw, 11) & ((1 << 53) - 1)  # 53 uniform bits each
    u = bits.to(torch.float64).mul_(2.0 ** -53).view(2, pairs)
    radius = torch.log1p(-u[0]).mul_(-2.0).sqrt_()  # 1 - u1 lies in (0, 1]: no log(0)
    angle = u[1].mul(2 * math.pi)
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return normal.to(torch.float32).view(shape)


def normal_noise(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) draws: from the OS's random source, or from `generator` (tests that check the
    arithmetic against a replayed draw)."""
    if generator is None:
        return os_random_normal(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


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
                       generator: torch.Generator | None = None) -> Tensors:
    """Each tensor plus N(0, std^2) noise on every coordinate (float32); the noise comes from
    the OS's random source unless a (test's) `generator` is given."""
    out: Tensors = {}
    for name, t in tensors.items():
        noise = normal_noise(tuple(t.shape), generator)
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
    noised = add_gaussian_noise(clipped, settings.noise_std, generator)
    return PrivatizedUpload(noised, norm, norm > settings.clip, settings.noise_std)
