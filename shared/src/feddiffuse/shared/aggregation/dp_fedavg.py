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

import torch

from ..privacy.mechanism import clip_update, normal_noise
from ..privacy.settings import PrivacySettings
from .base import AggregationStrategy, SegmentedUpdate


class DPFedAvg(AggregationStrategy):
    name = "dp-fedavg"

    def __init__(self, privacy: PrivacySettings, server_lr: float = 1.0,
                 generator: Callable[[], torch.Generator] | None = None) -> None:
        """`generator`: only for tests that replay the noise; the product draws it from the
        OS's random source."""
        if not server_lr > 0:
            raise ValueError("the server learning rate must be positive")
        self.privacy = privacy
        self.server_lr = float(server_lr)
        self._generator = generator
        self._global: Mapping[str, torch.Tensor] | None = None
        self._segment_of: Mapping[str, str] = {}
        self._names_by_segment: dict[str, list[str]] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.noise_added = False  # whether the last finalize added noise (central DP)

    @property
    def central(self) -> bool:
        return self.privacy.mode == "central"

    def begin(self, global_state: Mapping[str, torch.Tensor],
              segment_of: Mapping[str, str]) -> None:
        self._global = global_state
        self._segment_of = segment_of
        self._names_by_segment = {}
        for name in global_state:
            self._names_by_segment.setdefault(segment_of[name], []).append(name)
        self._sums = {}
        self._counts = {}
        self.noise_added = False

    def accumulate(self, update: SegmentedUpdate) -> None:
        if self._global is None:
            raise RuntimeError("begin() must be called before accumulate()")
        expected = {n for s in update.segments for n in self._names_by_segment.get(s, [])}
        if set(update.deltas) != expected:
            raise ValueError("an update must hold exactly the parameters of its segments")
        deltas: Mapping[str, torch.Tensor] = update.deltas
        if self.central:  # the guarantee holds whatever a client (or a lossy codec) sent
            deltas, _ = clip_update(update.deltas, self.privacy.clip)
        for name, delta in deltas.items():
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = delta.detach().to(torch.float32, copy=True)
            else:
                acc.add_(delta.detach().to(torch.float32))
        for s in update.segments:
            self._counts[s] = self._counts.get(s, 0) + 1

    def finalize(self) -> dict[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("begin() must be called before finalize()")
        noised = self.central and bool(self._sums)
        gen = self._generator() if noised and self._generator is not None else None
        std = self.privacy.noise_std
        out: dict[str, torch.Tensor] = {}
        for name, value in self._global.items():
            count = self._counts.get(self._segment_of[name], 0)
            if count == 0:
                out[name] = value
                continue
            total = self._sums[name]
            if noised:
                total.add_(normal_noise(tuple(total.shape), gen).mul_(std))
            mean = total.div_(float(count))
            if self.server_lr != 1.0:
                mean.mul_(self.server_lr)
            out[name] = mean.add_(value.to(torch.float32))
        self.noise_added = noised
        self._sums = {}
        return out

    @property
    def reported_segments(self) -> dict[str, int]:
        """segment -> number of clients that reported it (each weighs 1)."""
        return dict(self._counts)
