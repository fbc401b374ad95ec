"""DP-FedAvg (McMahan et al. 2018): uniform weights, clipped updates, Gaussian noise on the sum.

Per segment s: global[s] += server_lr * (sum_k clip(delta_k)[s] + noise[s]) / n_s, where
clip(delta_k) scales client k's whole update (all its segments together) to L2 norm <= C,
n_s is the number of clients that reported s (public under zero-out adjacency: see
feddiffuse.shared.privacy) and, under central DP only, noise ~ N(0, (Z C)^2) on every
coordinate of every reported segment, drawn from the OS's random source (os.urandom).
Under local DP the clients have clipped and noised their uploads: the hub neither clips
(that would cut the noise) nor adds noise; it takes the uniform mean.

The sensitivity of the vector of all segment sums to one client is C whatever segments it
uploads (usplit, udec), since the clip bounds its whole upload. Streaming as FedAvg is: one
running sum, plus the update being folded in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from ..privacy.mechanism import clip_update, normal_noise
from ..privacy.settings import PrivacySettings
from .base import SegmentedUpdate
from .fedavg import FedAvg


class DPFedAvg(FedAvg):
    """FedAvg's running sums with every update weighing 1 (its sample count is private), each
    update clipped again under central DP, and the noise added to the sums before the mean."""

    name = "dp-fedavg"

    def __init__(self, privacy: PrivacySettings, server_lr: float = 1.0,
                 generator: Callable[[], torch.Generator] | None = None) -> None:
        """`generator`: only for tests that replay the noise; the product draws it from the
        OS's random source."""
        super().__init__(server_lr)
        self.privacy = privacy
        self._generator = generator
        self.noise_added = False  # whether the last finalize added noise (central DP)

    @property
    def central(self) -> bool:
        return self.privacy.mode == "central"

    def begin(self, global_state: Mapping[str, torch.Tensor],
              segment_of: Mapping[str, str]) -> None:
        super().begin(global_state, segment_of)
        self.noise_added = False

    def accumulate(self, update: SegmentedUpdate) -> None:
        deltas = update.deltas
        if self.central:  # the guarantee holds whatever a client (or a lossy codec) sent
            deltas, _ = clip_update(update.deltas, self.privacy.clip)
        super().accumulate(replace(update, deltas=deltas, num_samples=1))

    def finalize(self) -> dict[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("begin() must be called before finalize()")
        noised = self.central and bool(self._sums)
        if noised:
            gen = self._generator() if self._generator is not None else None
            std = self.privacy.noise_std
            for name in self._global:  # the model's order: a replayed generator matches
                if self._weights.get(self._segment_of[name], 0):
                    total = self._sums[name]
                    total.add_(normal_noise(tuple(total.shape), gen).mul_(std))
        self.noise_added = noised
        return super().finalize()
