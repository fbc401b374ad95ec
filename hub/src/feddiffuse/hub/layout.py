"""The shape of the federation's model, read from a global file's header (no network built)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from feddiffuse.shared.codecs import FP32, Codec, data_bytes, header_entries
from feddiffuse.shared.model import SEGMENTS, segment_of
from feddiffuse.shared.wire import MAX_HEADER_BYTES, check_layout, read_header

# A delta's metadata (keys, round, sha256 of the base, counts) fits in this; what the hub
# allows an upload's header beyond the size of the header it would write itself.
HEADER_SLACK = 8 * 1024


def canonical_segments(segments: Iterable[str]) -> tuple[str, ...]:
    wanted = set(segments)
    unknown = wanted - set(SEGMENTS)
    if unknown:
        raise ValueError(f"unknown segment(s): {', '.join(sorted(unknown))}")
    return tuple(s for s in SEGMENTS if s in wanted)


@dataclass(frozen=True)
class ModelLayout:
    shapes: Mapping[str, tuple[int, ...]]  # parameter name -> shape
    segment_of: Mapping[str, str]

    @classmethod
    def from_file_prefix(cls, prefix: bytes) -> ModelLayout:
        header, _ = read_header(prefix)
        check_layout(header)
        shapes = {n: tuple(info["shape"]) for n, info in header.items()
                  if n != "__metadata__"}
        return cls(shapes, {n: segment_of(n) for n in shapes})

    def names_for(self, segments: Iterable[str]) -> list[str]:
        wanted = set(segments)
        return [n for n in self.shapes if self.segment_of[n] in wanted]

    def shapes_for(self, segments: Iterable[str]) -> dict[str, tuple[int, ...]]:
        return {n: self.shapes[n] for n in self.names_for(segments)}

    def params_for(self, segments: Iterable[str]) -> int:
        total = 0
        for n in self.names_for(segments):
            count = 1
            for d in self.shapes[n]:
                count *= d
            total += count
        return total

    def parameter_counts(self) -> dict[str, int]:
        out = {s: self.params_for([s]) for s in SEGMENTS}
        out["total"] = sum(out.values())
        return out

    def segments_of_names(self, names: Iterable[str]) -> tuple[str, ...] | None:
        """The segments whose parameters are exactly `names`, or None if no such set exists."""
        names = set(names)
        if not names <= set(self.shapes):
            return None
        segs = canonical_segments(self.segment_of[n] for n in names)
        return segs if set(self.names_for(segs)) == names else None

    def header_limit(self, segments: Iterable[str], codec: Codec = FP32) -> int:
        """The largest header the hub accepts for an upload of `segments` under `codec`."""
        names = self.names_for(segments)
        # An entry is '"name":{"dtype":"F32","shape":[...],"data_offsets":[a,b]},'; a codec
        # writes up to three per parameter ("name::idx" and so on).
        estimate = sum(len(n) + 60 + 12 * len(self.shapes[n]) + 2 * 12 for n in names)
        return min(MAX_HEADER_BYTES, estimate * header_entries(codec) + HEADER_SLACK)

    def upload_cap(self, segments: Iterable[str], codec: Codec = FP32) -> int:
        """The largest upload body the hub reads for `segments`: exact data plus the header."""
        segments = list(segments)
        return (8 + self.header_limit(segments, codec)
                + data_bytes(self.shapes_for(segments), codec))
