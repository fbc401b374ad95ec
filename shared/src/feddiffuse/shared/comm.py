"""Replay a federation's communication without training (`feddiffuse comm`).

The replay drives the same `RoundState` as the simulator and the hub with all-zero deltas, and
sizes every payload by encoding it with the wire codec, so its parameter and byte figures are
those a real run with the same settings produces (up to a few header bytes that depend on
the digits of each client's sample count).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import UserError
from .ledger import CommLedger
from .methods import check_method
from .model import build_unet, get_preset, segment_map
from .rounds import RoundState
from .wire import encode_tensors

_PLACEHOLDER_VERSION = "0" * 64  # a sha256 hex digest has this length


class _PayloadSizer:
    """Exact encoded sizes of zero tensors, cached by (names, metadata)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = shapes
        self._cache: dict[tuple, int] = {}

    def size(self, names: list[str], metadata: Mapping[str, object]) -> int:
        key = (tuple(names), tuple(sorted((k, str(v)) for k, v in metadata.items())))
        if key not in self._cache:
            zeros = {n: torch.zeros(self._shapes[n]) for n in names}
            self._cache[key] = len(encode_tensors(zeros, metadata))
        return self._cache[key]


def replay_ledger(preset: str, method: str, clients: int, rounds: int, seed: int = 0,
                  samples_per_client: int = 1) -> CommLedger:
    check_method(method)
    if clients < 1 or rounds < 1:
        raise UserError("--clients and --rounds must be at least 1.")
    if samples_per_client < 1:
        raise UserError("--samples-per-client must be at least 1.")
    p = get_preset(preset)
    model = build_unet(p, seed=0)
    seg_of = segment_map(model)
    global_state = {n: torch.zeros(tuple(t.shape)) for n, t in model.named_parameters()}
    shapes = {n: tuple(t.shape) for n, t in global_state.items()}
    sizer = _PayloadSizer(shapes)
    ids = [f"client-{i:02d}" for i in range(clients)]
    ledger = CommLedger()
    for r in range(1, rounds + 1):
        state = RoundState.open(method, r, ids, global_state, seg_of, seed=seed)
        for cid in ids:
            plan = state.plans[cid]
            names = state.names_for(plan.download)
            state.record_download(cid, sizer.size(names, {
                "kind": "global", "preset": p.name, "round": r,
                "version": _PLACEHOLDER_VERSION, "segments": ",".join(plan.download)}))
            up = state.expected_upload_shapes(cid)
            nbytes = sizer.size(list(up), {
                "kind": "delta", "preset": p.name, "round": r,
                "base_version": _PLACEHOLDER_VERSION, "num_samples": samples_per_client,
                "segments": ",".join(plan.upload)})
            state.accept(cid, {n: global_state[n] for n in up}, samples_per_client, nbytes)
        ledger.extend(state.finalize().transfers)
    return ledger
