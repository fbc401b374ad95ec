"""Replay a federation's communication without training (`feddiffuse comm`).

The replay drives the same `RoundState` as the simulator and the hub, and sizes every payload
as the hub and the clients write it (`payloads`: the same metadata, the same codecs, whose
sizes depend on the shapes alone), so its parameter and byte figures are those that cross
HTTP in a real run with the same settings, to the byte, when every client holds
`samples_per_client` images.
"""

from __future__ import annotations

import torch

from .codecs import FP32, payload_size
from .errors import UserError
from .ledger import CommLedger
from .methods import check_method
from .model import build_unet, get_preset, segment_map
from .payloads import (
    ALL_KEY,
    MEAN_LOSS_PLACEHOLDER,
    LinkCodecs,
    delta_metadata,
    global_metadata,
    segment_metadata,
    upload_metadata,
)
from .rounds import RoundState

_PLACEHOLDER_VERSION = "0" * 64  # a sha256 hex digest has this length


def replay_ledger(preset: str, method: str, clients: int, rounds: int, seed: int = 0,
                  samples_per_client: int = 1, links: LinkCodecs | None = None) -> CommLedger:
    check_method(method)
    if clients < 1 or rounds < 1:
        raise UserError("--clients and --rounds must be at least 1.")
    if samples_per_client < 1:
        raise UserError("--samples-per-client must be at least 1.")
    links = links or LinkCodecs()
    p = get_preset(preset)
    model = build_unet(p, seed=0)
    seg_of = segment_map(model)
    global_state = {n: torch.zeros(tuple(t.shape)) for n, t in model.named_parameters()}
    shapes = {n: tuple(t.shape) for n, t in global_state.items()}
    ids = [f"client-{i:02d}" for i in range(clients)]
    ledger = CommLedger()
    v = _PLACEHOLDER_VERSION
    for r in range(1, rounds + 1):
        state = RoundState.open(method, r, ids, global_state, seg_of, seed=seed)
        for cid in ids:
            plan = state.plans[cid]
            key = ",".join(plan.download)
            down = {n: shapes[n] for n in state.names_for(plan.download)}
            if r == 1:  # every client's first download: the whole initial model
                nbytes = payload_size(down, global_metadata(p.name, r), links.initial)
            elif links.sends_deltas:
                nbytes = payload_size(down, delta_metadata(p.name, r, v, v, key), links.downlink)
            elif key == ALL_KEY:
                nbytes = payload_size(down, global_metadata(p.name, r), FP32)
            else:
                nbytes = payload_size(down, segment_metadata(p.name, r, v, key), FP32)
            state.record_download(cid, nbytes)
            up = state.expected_upload_shapes(cid)
            nbytes = payload_size(up, upload_metadata(
                p.name, r, v, samples_per_client, ",".join(plan.upload),
                MEAN_LOSS_PLACEHOLDER), links.uplink)
            state.accept(cid, {n: global_state[n] for n in up}, samples_per_client, nbytes)
        ledger.extend(state.finalize().transfers)
    return ledger
