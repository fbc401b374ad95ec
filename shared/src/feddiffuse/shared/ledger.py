"""Communication accounting: parameters and bytes, uplink and downlink, per client and round.

Per client, the paper counts the initial full model (downlink of round 1), R uplinks of what it
reports, and R - 1 downlinks of what the hub sends back (paper.md, section 3). Bytes are the
exact sizes of the safetensors payloads that carry those parameters (header included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

UPLINK = "uplink"
DOWNLINK = "downlink"


@dataclass(frozen=True)
class Transfer:
    round_index: int
    client_id: str
    direction: str  # UPLINK or DOWNLINK
    segments: tuple[str, ...]
    params: int
    bytes: int


@dataclass
class CommLedger:
    transfers: list[Transfer] = field(default_factory=list)

    def record(self, round_index: int, client_id: str, direction: str,
               segments: Iterable[str], params: int, nbytes: int) -> Transfer:
        if direction not in (UPLINK, DOWNLINK):
            raise ValueError(f"unknown direction {direction!r}")
        t = Transfer(round_index, client_id, direction, tuple(segments), int(params), int(nbytes))
        self.transfers.append(t)
        return t

    def extend(self, transfers: Iterable[Transfer]) -> None:
        self.transfers.extend(transfers)

    def totals(self, round_index: int | None = None) -> dict:
        """Sums of params and bytes, in all and per direction (optionally for one round)."""
        out = {"total_params": 0, "total_bytes": 0,
               "uplink_params": 0, "uplink_bytes": 0,
               "downlink_params": 0, "downlink_bytes": 0}
        for t in self.transfers:
            if round_index is not None and t.round_index != round_index:
                continue
            out["total_params"] += t.params
            out["total_bytes"] += t.bytes
            out[f"{t.direction}_params"] += t.params
            out[f"{t.direction}_bytes"] += t.bytes
        return out

    def per_client(self) -> dict[str, dict]:
        out: dict[str, dict] = defaultdict(lambda: {"params": 0, "bytes": 0})
        for t in self.transfers:
            out[t.client_id]["params"] += t.params
            out[t.client_id]["bytes"] += t.bytes
        return dict(sorted(out.items()))

    def per_round(self) -> list[dict]:
        rounds = sorted({t.round_index for t in self.transfers})
        cumulative_params = cumulative_bytes = 0
        rows = []
        for r in rounds:
            tot = self.totals(r)
            cumulative_params += tot["total_params"]
            cumulative_bytes += tot["total_bytes"]
            rows.append({"round": r, **tot, "cumulative_params": cumulative_params,
                         "cumulative_bytes": cumulative_bytes})
        return rows

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "per_client": self.per_client(),
                "per_round": self.per_round(),
                "transfers": [asdict(t) for t in self.transfers]}
