import json
import struct

import pytest
import torch

from feddiffuse.shared.codecs import (
    CodecError,
    compress_with_feedback,
    decode_payload,
    encode,
    encode_payload,
    parse_codec,
    payload_size,
    roundtrip,
    topk_count,
    write_payload,
)
from feddiffuse.shared.errors import WireFormatError
from feddiffuse.shared.wire import encode_tensors, read_header

CODECS = ["fp32", "bf16", "int8", "topk:0.1", "topk:0.1+int8"]
SHAPES = {"a": (3, 70), "b": (5,), "c": (1,), "d": (300,)}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _rewrite(data: bytes, edit) -> bytes:
    """Parse a payload, let `edit(header, wire)` change it, write it again (valid layout)."""
    from safetensors.torch import load

    header, _ = read_header(data)
    wire = load(data)
    meta = {k: v for k, v in header["__metadata__"].items()}
    edit(meta, wire)
    from io import BytesIO

    from feddiffuse.shared.codecs import Codec
    buf = BytesIO()
    # Written as the non-fp32 writer would, whatever the codec, with the edited metadata.
    write_payload(buf, wire, {k.removeprefix("feddiffuse."): v for k, v in meta.items()
                              if k != "feddiffuse.codec"},
                  Codec(meta["feddiffuse.codec"], "x"))
    return buf.getvalue()


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_sizes_and_error_bounds(name):
    codec = parse_codec(name)
    t = _tensors()
    data = encode_payload(t, {"kind": "delta", "round": 2}, codec)
    assert len(data) == payload_size(SHAPES, {"kind": "delta", "round": 2}, codec)
    out, meta = decode_payload(data, codec, SHAPES)
    assert meta["feddiffuse.codec"] == codec.name and meta["feddiffuse.round"] == "2"
    assert all(out[n].dtype == torch.float32 and out[n].shape == t[n].shape for n in SHAPES)
    again, _ = decode_payload(encode_payload(t, {"kind": "delta", "round": 2}, codec), codec,
                              SHAPES)
    assert all(torch.equal(again[n], out[n]) for n in SHAPES)
    assert all(torch.equal(roundtrip(t, codec)[n], out[n]) for n in SHAPES)
    if name == "fp32":
        assert data == encode_tensors(t, {"kind": "delta", "round": 2})
        assert all(torch.equal(out[n], t[n]) for n in SHAPES)
    if name == "bf16":
        assert all(torch.allclose(out[n], t[n], rtol=1 / 128, atol=0) for n in SHAPES)
    if name == "int8":  # at most half a step of each block's scale
        for n in SHAPES:
            step = t[n].abs().max() / 127
            assert (out[n] - t[n]).abs().max() <= step / 2 + 1e-6
    if codec.sparse:
        for n in SHAPES:
            numel = t[n].numel()
            kept = (out[n] != 0).sum().item()
            assert kept == topk_count(numel, codec.fraction)
            # the kept values are the largest in magnitude
            threshold = t[n].abs().reshape(-1).sort(descending=True).values[kept - 1]
            assert bool((t[n].abs()[out[n] != 0] >= threshold).all())


def test_codec_names():
    assert parse_codec("topk:0.050+int8").name == "topk:0.05+int8"
    assert parse_codec("topk:.5").name == "topk:0.5"
    assert parse_codec("topk:0.05+int8").dense_form.name == "int8"
    assert parse_codec("topk:0.05").dense_form.name == "fp32"
    assert topk_count(100, parse_codec("topk:0.05").fraction) == 5  # exact, no float slop
    assert topk_count(7, parse_codec("topk:0.01").fraction) == 1
    for bad in ["fp16", "topk", "topk:0", "topk:0.6", "topk:1", "topk:-0.1", "topk:0.1+bf16",
                "topk:1e-3", ""]:
        with pytest.raises(CodecError, match="Unknown codec"):
            parse_codec(bad)


def test_encode_refuses_non_finite():
    with pytest.raises(ValueError, match="NaN"):
        encode({"a": torch.tensor([1.0, float("nan")])}, parse_codec("int8"))


def test_error_feedback_carries_what_was_not_sent():
    codec = parse_codec("topk:0.1")
    t = _tensors()
    wire, residual = compress_with_feedback(t, {}, codec)
    sent = roundtrip(t, codec)
    for n in SHAPES:
        assert torch.equal(sent[n] + residual[n], t[n])
    # next round: the residual is added before compressing
    t2 = _tensors(1)
    _, residual2 = compress_with_feedback(t2, residual, codec)
    sent2 = roundtrip({n: t2[n] + residual[n] for n in SHAPES}, codec)
    for n in SHAPES:
        assert torch.equal(sent2[n] + residual2[n], t2[n] + residual[n])
    assert compress_with_feedback(t, {}, parse_codec("fp32"))[1] == {}


def _payload(name: str) -> bytes:
    return encode_payload(_tensors(), {"kind": "delta"}, parse_codec(name))


def _set(key: str, fn):
    def edit(meta, wire):
        wire[key] = fn(wire[key])
    return edit


@pytest.mark.parametrize(("name", "edit", "match"), [
    ("int8", _set("a::scale", lambda s: s * float("nan")), "NaN or infinite scales"),
    ("int8", _set("a::scale", lambda s: -s), "negative scales"),
    ("int8", _set("a::scale", lambda s: s * 3e38), "non-finite"),
    ("int8", _set("d", lambda q: torch.full_like(q, -128)), "-128"),
    ("bf16", _set("b", lambda v: v * float("inf")), "NaN or infinite"),
    ("topk:0.1", _set("a::idx", lambda i: torch.flip(i, [0])), "strictly increasing"),
    ("topk:0.1", _set("a::idx", lambda i: torch.zeros_like(i)), "strictly increasing"),
    ("topk:0.1", _set("a::idx", lambda i: i + 1000), r"in \[0, 210\)"),
    ("topk:0.1", _set("a::idx", lambda i: i - 1000), r"in \[0, 210\)"),
    ("topk:0.1+int8", _set("d::val", lambda v: torch.full_like(v, -128)), "-128"),
    ("topk:0.1", _set("a::val", lambda v: v * float("nan")), "NaN"),
    ("topk:0.1", _set("a::idx", lambda i: i[:-1]), "expected \\[21\\]"),  # not the count
    ("topk:0.1", _set("a::idx", lambda i: torch.cat([i, i[-1:] + 1])), "expected \\[21\\]"),
    ("topk:0.1", _set("a::idx", lambda i: i.to(torch.int64)), "must be I32 under"),
    ("int8", _set("a", lambda q: q.to(torch.int32)), "must be I8 under"),
    ("int8", _set("a::scale", lambda s: s[:-1] if len(s) > 1 else s[:0]), "shape"),
])
def test_decode_refuses_bad_payloads(name, edit, match):
    with pytest.raises(WireFormatError, match=match):
        decode_payload(_rewrite(_payload(name), edit), parse_codec(name), SHAPES)


def test_decode_refuses_wrong_names_codec_and_sizes():
    data = _payload("int8")
    with pytest.raises(WireFormatError, match="do not match codec"):
        decode_payload(data, parse_codec("int8"), {**SHAPES, "e": (2,)})
    with pytest.raises(WireFormatError, match="do not match codec"):
        decode_payload(data, parse_codec("topk:0.1+int8"), SHAPES)
    relabelled = _rewrite(data, lambda meta, wire: meta.update(
        {"feddiffuse.codec": "bf16"}))
    with pytest.raises(WireFormatError, match="declares codec 'bf16'"):
        decode_payload(relabelled, parse_codec("int8"), SHAPES)
    with pytest.raises(WireFormatError, match="fill the file exactly"):
        decode_payload(data + b"\0" * 8, parse_codec("int8"), SHAPES)
    with pytest.raises(WireFormatError):
        decode_payload(data[:-1], parse_codec("int8"), SHAPES)
    # a header whose offsets overlap
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    begin, end = header["b"]["data_offsets"]
    header["b"]["data_offsets"] = [0, end - begin]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(WireFormatError, match="overlap|gaps"):
        decode_payload(struct.pack("<Q", len(text)) + text + data[8 + n:], parse_codec("int8"),
                       SHAPES)
