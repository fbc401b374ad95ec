"""Server-side aggregation strategies: one file per algorithm, one abstract base."""

from .base import AggregationStrategy, SegmentedUpdate
from .fedavg import FedAvg

__all__ = ["AggregationStrategy", "FedAvg", "SegmentedUpdate"]
