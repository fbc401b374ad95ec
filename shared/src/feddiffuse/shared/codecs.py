"""Codecs: how the values of a weights or delta file are stored on the wire.

A payload is still a safetensors file (never pickle), written deterministically, whose
``feddiffuse.codec`` metadata names its codec. For a parameter ``n`` of shape ``s`` with ``N``
values, each codec stores these tensors (``B`` = INT8_BLOCK values share one scale):

- ``fp32``: ``n`` F32 ``s`` (what every file was before codecs; lossless).
- ``bf16``: ``n`` BF16 ``s`` (round to nearest even).
- ``int8``: ``n`` I8 ``s`` and ``n::scale`` F32 ``[ceil(N / B)]``: block-wise absmax,
  ``value = q * scale`` with ``q`` in [-127, 127] and ``scale = absmax / 127``.
- ``topk:F``: the ``k = ceil(F * N)`` (at least 1) values of largest magnitude, the rest read
  as zero: ``n::idx`` I32 ``[k]`` (strictly increasing) and ``n::val`` F32 ``[k]``.
- ``topk:F+int8``: the same indices, the values block-wise int8: ``n::idx`` I32 ``[k]``,
  ``n::val`` I8 ``[k]``, ``n::scale`` F32 ``[ceil(k / B)]``.

Every size is a function of the shapes alone, so a payload's size is known before it is
written (the hub's upload cap, `feddiffuse comm`). Decoding checks everything a hostile sender
could get wrong: names, dtypes, shapes, exact sizes, finite values and scales, the int8 range,
index bounds and order (which also makes them unique), and the declared codec.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from .errors import UserError, WireFormatError
from .wire import PREFIX, ByteSink, _meta, read_header, stream_file, write_tensors

INT8_BLOCK = 256  # values per int8 scale
MAX_TOPK_FRACTION = Fraction(1, 2)  # past half, top-k costs more than the dense tensor
SEP = "::"  # joins a parameter's name and its part; parameter names never hold it
CODEC_HELP = ("fp32 (default), bf16, int8 (block-wise absmax), topk:F (the fraction F of each "
              "tensor with the largest magnitudes, 0 < F <= 0.5) or topk:F+int8.")

# I64 is never what a codec stores; the writer takes it so that tests can write such a file.
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I8": torch.int8, "I32": torch.int32,
           "I64": torch.int64}
_SIZES = {"F32": 4, "BF16": 2, "I8": 1, "I32": 4, "I64": 8}
_TOPK = re.compile(r"topk:([0-9]*\.?[0-9]+)(\+int8)?")


class CodecError(UserError):
    """An unknown codec name (a user's mistake: exit code 2 with one sentence)."""


@dataclass(frozen=True)
class Codec:
    name: str  # canonical, as written in metadata and the manifest
    values: str  # how values are stored: fp32, bf16 or int8
    fraction: Fraction | None = None  # top-k fraction; None: dense

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"

    @property
    def sparse(self) -> bool:
        return self.fraction is not None

    @property
    def dense_form(self) -> Codec:
        """The dense codec a whole model travels in (the initial broadcast): topk:F -> fp32,
        topk:F+int8 -> int8, a dense codec -> itself."""
        return parse_codec(self.values)


def parse_codec(spec: str) -> Codec:
    """The codec `spec` names; raises CodecError with what the names are."""
    text = spec.strip()
    if text in ("fp32", "bf16", "int8"):
        return Codec(text, text)
    m = _TOPK.fullmatch(text)
    if m is not None:
        try:
            dec = Decimal(m.group(1))
        except InvalidOperation:
            dec = Decimal(0)
        fraction = Fraction(dec)
        if 0 < fraction <= MAX_TOPK_FRACTION and len(m.group(1)) <= 12:
            plain = format(dec.normalize(), "f")
            plain = "0" + plain if plain.startswith(".") else plain
            values = "int8" if m.group(2) else "fp32"
            return Codec(f"topk:{plain}{m.group(2) or ''}", values, fraction)
    raise CodecError(f"Unknown codec {spec!r}; a codec is {CODEC_HELP}")


FP32 = parse_codec("fp32")


def topk_count(numel: int, fraction: Fraction) -> int:
    """How many values top-k keeps of a tensor of `numel`: ceil(F * N), at least 1."""
    if numel == 0:
        return 0
    return min(numel, max(1, -(-(fraction.numerator * numel) // fraction.denominator)))


def _blocks(n: int) -> int:
    return -(-n // INT8_BLOCK)


# -- the layout ------------------------------------------------------------------------------

def wire_spec(shapes: Mapping[str, tuple[int, ...]], codec: Codec
              ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Wire name -> (dtype, shape) of every tensor a payload of `shapes` holds."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if SEP in name:
            raise ValueError(f"parameter name {name!r} holds {SEP!r}")
        shape = tuple(shape)
        numel = math.prod(shape)
        if codec.sparse:
            assert codec.fraction is not None
            k = topk_count(numel, codec.fraction)
            out[name + SEP + "idx"] = ("I32", (k,))
            if codec.values == "int8":
                out[name + SEP + "val"] = ("I8", (k,))
                out[name + SEP + "scale"] = ("F32", (_blocks(k),))
            else:
                out[name + SEP + "val"] = ("F32", (k,))
        elif codec.values == "int8":
            out[name] = ("I8", shape)
            out[name + SEP + "scale"] = ("F32", (_blocks(numel),))
        else:
            out[name] = ("BF16" if codec.values == "bf16" else "F32", shape)
    return out


def _header(spec: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, object],
            codec: Codec) -> bytes:
    header: dict[str, object] = {"__metadata__": _meta({**metadata, "codec": codec.name})}
    offset = 0
    for name in sorted(spec):
        dtype, shape = spec[name]
        size = _SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def data_bytes(shapes: Mapping[str, tuple[int, ...]], codec: Codec) -> int:
    """Size of the data section of a payload of `shapes` (exact, any codec)."""
    return sum(_SIZES[d] * math.prod(s) for d, s in wire_spec(shapes, codec).values())


def payload_size(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, object],
                 codec: Codec) -> int:
    """Exact size of the payload `encode_payload` writes for tensors of `shapes`."""
    return 8 + len(_header(wire_spec(shapes, codec), metadata, codec)) + data_bytes(shapes, codec)


def header_entries(codec: Codec) -> int:
    """Header entries per parameter (for the hub's header limit)."""
    return 3 if codec.sparse and codec.values == "int8" else 2 if codec.sparse or (
        codec.values == "int8") else 1


def check_payload_layout(header: Mapping[str, object], codec: Codec,
                         expected_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Check a parsed header against what `codec` stores for `expected_shapes`, before any
    tensor byte is read: exactly those names, dtypes and shapes, offsets tiling the data with
    no gap or overlap. Returns the data section's size. Raises WireFormatError."""
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise WireFormatError("safetensors metadata must map strings to strings")
    spec = wire_spec(expected_shapes, codec)
    names = set(header) - {"__metadata__"}
    missing, extra = set(spec) - names, names - set(spec)
    if missing or extra:
        raise WireFormatError(f"the tensors do not match codec {codec.name}: {len(missing)} "
                              f"missing, {len(extra)} unexpected")
    spans = []
    for name, (dtype, shape) in spec.items():
        info = header[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireFormatError(f"tensor {name!r} has a malformed header entry")
        if info["dtype"] != dtype:
            raise WireFormatError(f"tensor {name!r} must be {dtype} under codec {codec.name}")
        got = info["shape"]
        if not (isinstance(got, list) and all(type(d) is int for d in got)) or tuple(
                got) != shape:
            raise WireFormatError(f"tensor {name!r} has shape {got!r}, expected {list(shape)} "
                                  f"under codec {codec.name}")
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise WireFormatError(f"tensor {name!r} has malformed data offsets")
        if offsets[1] - offsets[0] != _SIZES[dtype] * math.prod(shape):
            raise WireFormatError(f"tensor {name!r}: its byte range does not match its shape")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise WireFormatError("tensor data ranges overlap or leave gaps")
        end = stop
    return end


# -- encoding --------------------------------------------------------------------------------

def _quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax int8 of a 1-D fp32 tensor: (q int8 [N], scales fp32 [blocks])."""
    n = flat.numel()
    padded = torch.zeros(_blocks(n) * INT8_BLOCK, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(-1, INT8_BLOCK)
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(-1)[:n].clone(), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    return q.to(torch.float32) * scale.repeat_interleave(INT8_BLOCK)[:n]


def encode(tensors: Mapping[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """The wire tensors of `tensors` (float, finite) under `codec`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")
        flat = t.reshape(-1)
        if codec.sparse:
            assert codec.fraction is not None
            k = topk_count(flat.numel(), codec.fraction)
            order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
            idx = order.sort().values
            vals = flat[idx]
            out[name + SEP + "idx"] = idx.to(torch.int32)
            if codec.values == "int8":
                q, scale = _quantize(vals)
                out[name + SEP + "val"], out[name + SEP + "scale"] = q, scale
            else:
                out[name + SEP + "val"] = vals.clone()
        elif codec.values == "int8":
            q, scale = _quantize(flat)
            out[name], out[name + SEP + "scale"] = q.view(t.shape), scale
        elif codec.values == "bf16":
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = t.clone()
    return out


def decode(wire: Mapping[str, torch.Tensor], codec: Codec,
           shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The fp32 tensors `wire` stands for, after checking every value (WireFormatError)."""
    spec = wire_spec(shapes, codec)
    if set(wire) != set(spec):
        raise WireFormatError(f"the tensors do not match codec {codec.name}")
    for wname, (dtype, shape) in spec.items():
        t = wire[wname]
        if t.dtype != _DTYPES[dtype] or tuple(t.shape) != shape:
            raise WireFormatError(f"tensor {wname!r} must be {dtype} {list(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "scales" if wname.endswith(SEP + "scale") else "values"
            raise WireFormatError(f"tensor {wname!r} holds NaN or infinite {what}")
        if wname.endswith(SEP + "scale") and bool((t < 0).any()):
            raise WireFormatError(f"tensor {wname!r} holds negative scales")
        if dtype == "I8" and bool((t == -128).any()):
            raise WireFormatError(f"tensor {wname!r} holds -128, outside int8's [-127, 127]")
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        numel = math.prod(shape)
        if codec.sparse:
            idx = wire[name + SEP + "idx"].to(torch.int64)
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel
                                or not bool((idx[1:] > idx[:-1]).all())):
                raise WireFormatError(f"tensor {name + SEP + 'idx'!r} must hold strictly "
                                      f"increasing indices in [0, {numel})")
            val = wire[name + SEP + "val"]
            if codec.values == "int8":
                val = _dequantize(val, wire[name + SEP + "scale"])
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[idx] = val.to(torch.float32)
            out[name] = flat.view(shape)
        elif codec.values == "int8":
            out[name] = _dequantize(wire[name].reshape(-1), wire[name + SEP + "scale"]
                                    ).view(shape)
        else:
            out[name] = wire[name].to(torch.float32).reshape(shape)
        if not bool(torch.isfinite(out[name]).all()):  # int8 times a huge scale
            raise WireFormatError(f"tensor {name!r} decodes to non-finite values")
    return out


def roundtrip(tensors: Mapping[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """What a receiver decodes from `tensors` sent under `codec` (bit for bit)."""
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    return decode(encode(tensors, codec), codec, shapes)


def compress_with_feedback(delta: Mapping[str, torch.Tensor],
                           residual: Mapping[str, torch.Tensor], codec: Codec
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Error feedback: send `delta + residual`; returns (wire tensors, the new residual, i.e.
    what was not sent). A lossless codec keeps no residual."""
    corrected = {n: t + residual[n] if n in residual else t for n, t in delta.items()}
    wire = encode(corrected, codec)
    if codec.lossless:
        return wire, {}
    shapes = {n: tuple(t.shape) for n, t in corrected.items()}
    sent = decode(wire, codec, shapes)
    return wire, {n: corrected[n].to(torch.float32) - sent[n] for n in corrected}


# -- files -----------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_payload(sink: ByteSink, wire: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, object], codec: Codec) -> tuple[str, int]:
    """Stream encoded tensors (`encode`'s output) as a deterministic safetensors file into
    `sink`; returns (sha256, size). fp32 payloads are byte for byte `wire.write_tensors`."""
    if codec.lossless:
        return write_tensors(sink, wire, metadata, "fp32")
    spec = {}
    for name, t in wire.items():
        dtype = next(k for k, v in _DTYPES.items() if v == t.dtype)
        spec[name] = (dtype, tuple(t.shape))
    blocks = (_raw(wire[name].to("cpu")) for name in sorted(wire) if wire[name].numel())
    return stream_file(sink, _header(spec, metadata, codec), blocks)


def encode_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object],
                   codec: Codec) -> bytes:
    """`tensors` (fp32 values) encoded under `codec` as safetensors bytes."""
    buffer = io.BytesIO()
    write_payload(buffer, encode(tensors, codec), metadata, codec)
    return buffer.getvalue()


def payload_codec(metadata: Mapping[str, str]) -> str:
    """The codec a payload's metadata declares (files from before codecs: fp32)."""
    return metadata.get(PREFIX + "codec", "fp32")


def decode_payload(data: bytes, codec: Codec, expected_shapes: Mapping[str, tuple[int, ...]]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode and validate a payload of `expected_shapes` written under `codec`; returns the
    fp32 tensors and the metadata. Raises WireFormatError on anything else."""
    header, data_start = read_header(data)
    if check_payload_layout(header, codec, expected_shapes) != len(data) - data_start:
        raise WireFormatError("the tensor data does not fill the file exactly")
    metadata = dict(header.get("__metadata__") or {})
    declared = payload_codec(metadata)
    if declared != codec.name:
        raise WireFormatError(f"the file declares codec {declared!r}, expected {codec.name!r}")
    try:
        wire = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WireFormatError(f"not a valid safetensors file: {exc}") from exc
    return decode(wire, codec, expected_shapes), metadata
