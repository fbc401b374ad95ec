"""The aggregation strategy interface.

A strategy sees a round as: `begin` with the current global weights, any number of
`accumulate` calls (one per accepted client update, in a canonical order), then `finalize`,
which returns the next global weights. Strategies must be streaming: their memory may not grow
with the number of updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentedUpdate:
    """One client's report: deltas (local - global) for whole segments, and its sample count."""

    client_id: str
    segments: tuple[str, ...]
    deltas: Mapping[str, torch.Tensor]
    num_samples: int


class AggregationStrategy(ABC):
    name: str = "abstract"

    @abstractmethod
    def begin(self, global_state: Mapping[str, torch.Tensor],
              segment_of: Mapping[str, str]) -> None:
        """Start a round from `global_state` (name -> tensor); `segment_of` maps names."""

    @abstractmethod
    def accumulate(self, update: SegmentedUpdate) -> None:
        """Fold one accepted update into the running state."""

    @abstractmethod
    def finalize(self) -> dict[str, torch.Tensor]:
        """The next global state. Tensors of segments nobody reported are returned as-is."""

    @property
    @abstractmethod
    def reported_segments(self) -> dict[str, int]:
        """segment -> total sample weight reported so far."""
