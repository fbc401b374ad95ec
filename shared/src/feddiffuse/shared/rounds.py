"""One federated round as a state machine, shared by the simulator and the hub.

    open -> (record downloads, accept updates)* -> finalize -> next global weights + ledger

The simulator drives it in memory; the hub drives it around its store and, after a restart,
replays the stored uploads into a fresh RoundState in the same canonical order (sorted by
client id), which gives the same result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .aggregation import AggregationStrategy, FedAvg, SegmentedUpdate
from .errors import FedDiffuseError
from .ledger import DOWNLINK, UPLINK, Transfer
from .methods import ClientPlan, check_method, plan_round
from .seeds import training_seed  # noqa: F401 - the simulator takes it from here


class RoundError(FedDiffuseError):
    """An update that the round cannot accept (wrong client, segments, round, or duplicate)."""


@dataclass
class RoundResult:
    round_index: int
    global_state: dict[str, torch.Tensor]
    transfers: list[Transfer]
    reported: dict[str, int]  # segment -> total sample weight
    participants: list[str]
    missing: list[str]


@dataclass
class RoundState:
    method: str
    round_index: int
    plans: dict[str, ClientPlan]
    global_state: Mapping[str, torch.Tensor]
    segment_of: Mapping[str, str]
    strategy: AggregationStrategy = field(default_factory=FedAvg)
    transfers: list[Transfer] = field(default_factory=list)
    _accepted: dict[str, SegmentedUpdate] = field(default_factory=dict)
    _finalized: bool = False

    @classmethod
    def open(cls, method: str, round_index: int, participants: Sequence[str],
             global_state: Mapping[str, torch.Tensor], segment_of: Mapping[str, str],
             seed: int, strategy: AggregationStrategy | None = None) -> RoundState:
        check_method(method)
        if not participants:
            raise RoundError("a round needs at least one participant")
        state = cls(method, round_index, plan_round(method, participants, round_index, seed),
                    global_state, segment_of, strategy or FedAvg())
        state.strategy.begin(global_state, segment_of)
        return state

    # -- what each client gets and gives -------------------------------------------------

    def names_for(self, segments: Sequence[str]) -> list[str]:
        wanted = set(segments)
        return [n for n in self.global_state if self.segment_of[n] in wanted]

    def params_for(self, segments: Sequence[str]) -> int:
        return sum(self.global_state[n].numel() for n in self.names_for(segments))

    def download_tensors(self, client_id: str) -> dict[str, torch.Tensor]:
        return {n: self.global_state[n] for n in self.names_for(self._plan(client_id).download)}

    def expected_upload_shapes(self, client_id: str) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.global_state[n].shape)
                for n in self.names_for(self._plan(client_id).upload)}

    def _plan(self, client_id: str) -> ClientPlan:
        try:
            return self.plans[client_id]
        except KeyError:
            raise RoundError(f"client {client_id!r} is not a participant of round "
                             f"{self.round_index}") from None

    # -- events ---------------------------------------------------------------------------

    def record_download(self, client_id: str, nbytes: int) -> Transfer:
        plan = self._plan(client_id)
        t = Transfer(self.round_index, client_id, DOWNLINK, plan.download,
                     self.params_for(plan.download), int(nbytes))
        self.transfers.append(t)
        return t

    def accept(self, client_id: str, deltas: Mapping[str, torch.Tensor], num_samples: int,
               nbytes: int) -> Transfer:
        """Validate one client's update and fold it into the running aggregate."""
        if self._finalized:
            raise RoundError(f"round {self.round_index} is closed")
        plan = self._plan(client_id)
        if client_id in self._accepted:
            raise RoundError(f"client {client_id!r} already reported in round "
                             f"{self.round_index}")
        if num_samples <= 0:
            raise RoundError("an update must carry a positive sample count")
        expected = self.expected_upload_shapes(client_id)
        if set(deltas) != set(expected):
            raise RoundError("the update does not hold exactly the assigned segments")
        for name, shape in expected.items():
            if tuple(deltas[name].shape) != shape:
                raise RoundError(f"tensor {name!r} has the wrong shape")
        update = SegmentedUpdate(client_id, plan.upload, deltas, int(num_samples))
        self.strategy.accumulate(update)
        # Keep only the bookkeeping, not the tensors: memory must not grow with K.
        self._accepted[client_id] = SegmentedUpdate(client_id, plan.upload, {}, num_samples)
        t = Transfer(self.round_index, client_id, UPLINK, plan.upload,
                     self.params_for(plan.upload), int(nbytes))
        self.transfers.append(t)
        return t

    @property
    def reported(self) -> list[str]:
        return sorted(self._accepted)

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.plans) - set(self._accepted))

    @property
    def complete(self) -> bool:
        return not self.missing

    def finalize(self) -> RoundResult:
        if self._finalized:
            raise RoundError(f"round {self.round_index} is already finalized")
        self._finalized = True
        new_global = self.strategy.finalize()
        return RoundResult(self.round_index, new_global, list(self.transfers),
                           self.strategy.reported_segments, sorted(self.plans), self.missing)
