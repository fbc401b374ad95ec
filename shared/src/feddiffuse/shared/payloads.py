"""What crosses the network in each direction, shared by the hub, the client, the simulator
and `feddiffuse comm`: the metadata of every file kind, and the downlink's arithmetic.

Each direction of a federation has a codec (`codecs`). The uplink codec encodes a client's
delta (with error feedback on the client). With a lossless (fp32) downlink the hub sends
global weights as today. With a lossy one it sends, from round 2, the round's update in the
downlink codec and applies to its own global model the very update it sends, decoded, so hub
and clients hold the same bytes; the initial model travels in the codec's dense form, and the
hub's first global version is that payload decoded. Since every codec's sizes depend on the
shapes alone, the sizes here are exact without encoding anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .codecs import FP32, Codec, decode, encode, parse_codec
from .model import SEGMENTS

ALL_KEY = ",".join(SEGMENTS)  # the segments key of a whole model
GLOBAL_DELTA_KIND = "global-delta"
# Uploads write their mean loss in this fixed width, so that a file's size does not depend
# on the loss's digits and `feddiffuse comm` can count every byte.
MEAN_LOSS_PLACEHOLDER = 0.0


@dataclass(frozen=True)
class LinkCodecs:
    uplink: Codec = FP32
    downlink: Codec = FP32

    @classmethod
    def parse(cls, uplink: str = "fp32", downlink: str = "fp32") -> LinkCodecs:
        return cls(parse_codec(uplink), parse_codec(downlink))

    @property
    def sends_deltas(self) -> bool:
        """Whether the hub sends updates (not weights) from round 2 on."""
        return not self.downlink.lossless

    @property
    def initial(self) -> Codec:
        """The codec of the initial broadcast (the downlink's dense form)."""
        return self.downlink.dense_form


def format_mean_loss(value: float) -> str:
    return f"{value:.6e}"


def global_metadata(preset: str, round_index: int) -> dict[str, object]:
    """Metadata of a full global model file; `round_index` is the round it opens."""
    return {"kind": "global", "preset": preset, "round": round_index,
            "completed_rounds": round_index - 1, "segments": ALL_KEY}


def segment_metadata(preset: str, round_index: int, version: str, key: str
                     ) -> dict[str, object]:
    """Metadata of some segments of global `version` (which opens `round_index`)."""
    return {"kind": "global", "preset": preset, "round": round_index, "version": version,
            "segments": key}


def delta_metadata(preset: str, round_index: int, version: str, base_version: str, key: str
                   ) -> dict[str, object]:
    """Metadata of the update from `base_version` to `version` (which opens `round_index`)."""
    return {"kind": GLOBAL_DELTA_KIND, "preset": preset, "round": round_index,
            "version": version, "base_version": base_version, "segments": key}


def upload_metadata(preset: str, round_index: int, base_version: str, num_samples: int,
                    segments: str, mean_loss: float | None) -> dict[str, object]:
    meta: dict[str, object] = {"kind": "delta", "preset": preset, "round": round_index,
                               "base_version": base_version, "num_samples": int(num_samples),
                               "segments": segments}
    if mean_loss is not None:
        meta["mean_loss"] = format_mean_loss(mean_loss)
    return meta


def initial_global(state: Mapping[str, torch.Tensor], links: LinkCodecs
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The first global version and the wire tensors of the initial broadcast (None when the
    initial model travels as the fp32 global file itself)."""
    state = {n: t.detach().to("cpu", torch.float32) for n, t in state.items()}
    if links.initial.lossless:
        return state, None
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    wire = encode(state, links.initial)
    return decode(wire, links.initial, shapes), wire


def apply_downlink(base: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor],
                   codec: Codec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The next global model under a lossy downlink, and the update's wire tensors: the
    update `aggregated - base` is encoded, decoded, and added to `base`, exactly as a client
    holding `base` adds it. One tensor at a time."""
    new: dict[str, torch.Tensor] = {}
    wire: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        part = encode({name: aggregated[name] - b}, codec)
        new[name] = apply_update({name: b}, decode(part, codec, {name: tuple(b.shape)}))[name]
        wire.update(part)
    return new, wire


def apply_update(held: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """`held + update` for the update's tensors (the one addition both sides do)."""
    return {n: held[n].to(torch.float32) + u for n, u in update.items()}


def wire_subset(wire: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The wire tensors of parameters `names` (a download of some segments)."""
    wanted = set(names)
    return {w: t for w, t in wire.items() if w.split("::", 1)[0] in wanted}
