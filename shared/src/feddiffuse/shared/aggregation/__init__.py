"""Server-side aggregation strategies: one file per algorithm, one abstract base."""

from .base import AggregationStrategy, SegmentedUpdate
from .dp_fedavg import DPFedAvg
from .fedavg import FedAvg

__all__ = ["AggregationStrategy", "DPFedAvg", "FedAvg", "SegmentedUpdate"]
