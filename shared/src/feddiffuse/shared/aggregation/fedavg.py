"""FedAvg (McMahan et al., 2017) over deltas, per segment, streaming.

global[s] += sum_k n_k * delta_k[s] / sum_k n_k, where k ranges over the clients that reported
segment s this round (weights renormalised per segment, as USplit needs). A segment nobody
reported keeps its value. Memory: one running sum the size of the reported segments, plus the
update being folded in, whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import AggregationStrategy, SegmentedUpdate


class FedAvg(AggregationStrategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        # The server's step size: global += server_lr * weighted mean delta. 1.0 is plain
        # FedAvg (McMahan et al.); above 1 it extrapolates along the clients' mean update
        # (the server learning rate of Reddi et al. 2021, "Adaptive Federated Optimization").
        if not server_lr > 0:
            raise ValueError("the server learning rate must be positive")
        self.server_lr = float(server_lr)
        self._global: Mapping[str, torch.Tensor] | None = None
        self._segment_of: Mapping[str, str] = {}
        self._names_by_segment: dict[str, list[str]] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, int] = {}

    def begin(self, global_state: Mapping[str, torch.Tensor],
              segment_of: Mapping[str, str]) -> None:
        self._global = global_state
        self._segment_of = segment_of
        self._names_by_segment = {}
        for name in global_state:
            self._names_by_segment.setdefault(segment_of[name], []).append(name)
        self._sums = {}
        self._weights = {}

    def accumulate(self, update: SegmentedUpdate) -> None:
        if self._global is None:
            raise RuntimeError("begin() must be called before accumulate()")
        if update.num_samples <= 0:
            raise ValueError("an update must carry a positive sample count")
        expected = {n for s in update.segments for n in self._names_by_segment.get(s, [])}
        if set(update.deltas) != expected:
            raise ValueError("an update must hold exactly the parameters of its segments")
        w = float(update.num_samples)
        for name, delta in update.deltas.items():
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = delta.detach().to(torch.float32).mul(w)
            else:
                acc.add_(delta.detach().to(torch.float32), alpha=w)
        for s in update.segments:
            self._weights[s] = self._weights.get(s, 0) + update.num_samples

    def finalize(self) -> dict[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("begin() must be called before finalize()")
        out: dict[str, torch.Tensor] = {}
        for name, value in self._global.items():
            total = self._weights.get(self._segment_of[name], 0)
            if total == 0:
                out[name] = value
            else:
                # In place: the running sum becomes the new tensor (no extra model copy).
                mean = self._sums[name].div_(float(total))
                if self.server_lr != 1.0:
                    mean.mul_(self.server_lr)
                out[name] = mean.add_(value.to(torch.float32))
        self._sums = {}
        return out

    @property
    def reported_segments(self) -> dict[str, int]:
        return dict(self._weights)
