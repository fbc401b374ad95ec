"""Seeds derived from a federation's seed (no PyTorch here: the hub's admin commands use it)."""

from __future__ import annotations

import hashlib


def training_seed(federation_seed: int, round_index: int, client_id: str) -> int:
    """The seed a client trains with in a round: fixed by the federation's seed, distinct per
    client. The hub puts it in each client's manifest and the simulator uses the same, so a
    simulation and a real federation train every client alike."""
    digest = hashlib.sha256(f"train:{federation_seed}:{round_index}:{client_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
