"""Server-side aggregation strategies: one file per algorithm, one abstract base."""

from .base import AggregationStrategy, SegmentedUpdate
from .fedavg import FedAvg

STRATEGIES: dict[str, type[AggregationStrategy]] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "AggregationStrategy", "FedAvg", "SegmentedUpdate"]
