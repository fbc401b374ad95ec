"""The four training methods: which segments each client reports and receives in a round.

Semantics follow the handbook's paper.md, section 2. Every client always trains the whole
UNet; methods only differ in what crosses the network:

| method  | client -> hub                  | hub -> client (round >= 2) | personal segments     |
|---------|--------------------------------|----------------------------|-----------------------|
| full    | everything                     | everything                 | none                  |
| usplit  | its assigned segments (pairs)  | everything                 | none                  |
| ulatdec | bottleneck + decoder           | bottleneck + decoder       | encoder               |
| udec    | decoder                        | decoder                    | encoder + bottleneck  |

In its first round every client receives the full initial model, whatever the method.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError
from .model import SEGMENTS

METHODS: tuple[str, ...] = ("full", "usplit", "ulatdec", "udec")

ALL: tuple[str, ...] = SEGMENTS
_SHARED_SEGMENTS: dict[str, tuple[str, ...]] = {
    "full": ALL,
    "usplit": ALL,
    "ulatdec": ("bottleneck", "decoder"),
    "udec": ("decoder",),
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    return method


def shared_segments(method: str) -> tuple[str, ...]:
    """Segments the hub keeps a global version of (what is ever aggregated)."""
    return _SHARED_SEGMENTS[check_method(method)]


def personal_segments(method: str) -> tuple[str, ...]:
    """Segments that never leave a client after the initial broadcast."""
    shared = set(shared_segments(method))
    return tuple(s for s in SEGMENTS if s not in shared)


def has_personal_models(method: str) -> bool:
    return bool(personal_segments(method))


def download_segments(method: str, round_index: int) -> tuple[str, ...]:
    """What the hub sends a client at the start of round `round_index` (1-based)."""
    check_method(method)
    if round_index < 1:
        raise ValueError("rounds are numbered from 1")
    if round_index == 1:
        return ALL
    return _SHARED_SEGMENTS[method]


def _canonical(segments: set[str]) -> tuple[str, ...]:
    return tuple(s for s in SEGMENTS if s in segments)


def usplit_assignment(client_ids: Sequence[str], round_index: int, seed: int
                      ) -> dict[str, tuple[str, ...]]:
    """USplit's reporting assignment for one round, drawn afresh from (seed, round).

    Clients are shuffled and paired; in each pair one reports the encoder and the other the
    decoder, and the bottleneck goes at random to one of the two. With an odd count the
    unpaired client reports the bottleneck plus, at random, the encoder or the decoder.
    A single client reports everything.
    """
    ids = sorted(client_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be unique")
    if not ids:
        return {}
    if len(ids) == 1:
        return {ids[0]: ALL}
    # A local RNG seeded from (seed, round): reproducible, independent of global state.
    rng = random.Random(f"usplit:{seed}:{round_index}")
    rng.shuffle(ids)
    out: dict[str, tuple[str, ...]] = {}
    for a, b in zip(ids[0::2], ids[1::2], strict=False):
        enc, dec = (a, b) if rng.random() < 0.5 else (b, a)
        mid = a if rng.random() < 0.5 else b
        out[enc] = _canonical({"encoder"} | ({"bottleneck"} if mid == enc else set()))
        out[dec] = _canonical({"decoder"} | ({"bottleneck"} if mid == dec else set()))
    if len(ids) % 2:
        last = ids[-1]
        out[last] = _canonical({"bottleneck", rng.choice(("encoder", "decoder"))})
    return out


def upload_assignment(method: str, client_ids: Sequence[str], round_index: int, seed: int
                      ) -> dict[str, tuple[str, ...]]:
    """client id -> segments it reports at the end of round `round_index`."""
    check_method(method)
    if method == "usplit":
        return usplit_assignment(client_ids, round_index, seed)
    segs = _SHARED_SEGMENTS[method]
    return {c: segs for c in client_ids}


@dataclass(frozen=True)
class ClientPlan:
    """What one client does in one round."""

    client_id: str
    round_index: int
    download: tuple[str, ...]
    upload: tuple[str, ...]


def plan_round(method: str, client_ids: Sequence[str], round_index: int, seed: int
               ) -> dict[str, ClientPlan]:
    uploads = upload_assignment(method, client_ids, round_index, seed)
    down = download_segments(method, round_index)
    return {c: ClientPlan(c, round_index, down, uploads[c]) for c in sorted(client_ids)}
