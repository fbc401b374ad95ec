import json
import struct

import pytest
import torch

from feddiffuse.shared.errors import UserError, WireFormatError
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.wire import (
    decode_tensors,
    encode_tensors,
    load_model,
    load_weights,
    save_weights,
)


def test_round_trip_keeps_values_and_metadata():
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    data = encode_tensors(t, {"round": 3, "kind": "delta"})
    out, meta = decode_tensors(data, {"a": (3, 4), "b": (5,)})
    assert torch.equal(out["a"], t["a"]) and torch.equal(out["b"], t["b"])
    assert meta["feddiffuse.round"] == "3" and meta["feddiffuse.codec"] == "fp32"
    assert meta["feddiffuse.format_version"] == "1"


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({"a": (3, 4)}, "names do not match"),
        ({"a": (3, 4), "b": (5,), "c": (1,)}, "names do not match"),
        ({"a": (4, 3), "b": (5,)}, "shape"),
    ],
)
def test_decode_rejects_unexpected_names_and_shapes(expected, match):
    data = encode_tensors({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, {})
    with pytest.raises(WireFormatError, match=match):
        decode_tensors(data, expected)


def test_decode_rejects_non_finite_values_and_garbage():
    with pytest.raises(WireFormatError, match="NaN"):
        decode_tensors(encode_tensors({"a": torch.tensor([1.0, float("nan")])}, {}))
    with pytest.raises(WireFormatError):
        decode_tensors(b"\x00" * 4)
    with pytest.raises(WireFormatError, match="exceeds"):
        decode_tensors(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(WireFormatError, match="JSON"):
        decode_tensors(struct.pack("<Q", 4) + b"\xff\xfe{}")
    header = json.dumps({"a": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}).encode()
    with pytest.raises(WireFormatError):
        decode_tensors(struct.pack("<Q", len(header)) + header + b"\x00" * 8)


def test_decode_rejects_wrong_dtype():
    from safetensors.torch import save

    data = save({"a": torch.zeros(2, dtype=torch.float16)})
    with pytest.raises(WireFormatError, match="F32"):
        decode_tensors(data, {"a": (2,)})


def test_weights_file_records_its_preset_and_rebuilds_the_model(tmp_path):
    model = build_unet("tiny", seed=1)
    path = tmp_path / "m.safetensors"
    save_weights(path, dict(model.named_parameters()), {"preset": "tiny", "kind": "global"})
    loaded, meta = load_model(path)
    assert meta["feddiffuse.preset"] == "tiny"
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="No weights file"):
        load_weights(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a FedDiffuse weights file"):
        load_weights(bad)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(UserError, match="preset"):
        load_model(plain)


def test_save_requires_a_preset(tmp_path):
    with pytest.raises(ValueError):
        save_weights(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {})


def test_encoding_is_identical_across_processes():
    # A global version is the sha256 of its file: the bytes must not depend on the process.
    import subprocess
    import sys

    code = ("import torch;from feddiffuse.shared.wire import encode_tensors, sha256_hex;"
            "print(sha256_hex(encode_tensors({'b': torch.arange(6.).reshape(2, 3), "
            "'a': torch.ones(4)}, {'round': 3, 'kind': 'delta', 'preset': 'tiny', "
            "'z': 1, 'y': 2, 'x': 3})))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(3)}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_encoding_is_readable_by_safetensors_itself():
    from safetensors.torch import load

    t = {"w": torch.randn(3, 5), "a": torch.zeros(0), "z": torch.ones(1)}
    out = load(encode_tensors(t, {"kind": "global"}))
    assert set(out) == set(t) and all(torch.equal(out[k], t[k]) for k in t)


def _frame(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("body", [
    _frame(b"[" * 5000 + b"]" * 5000),  # deep nesting
    _frame(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'),
    _frame(b'{"a":{"dtype":"F32","shape":null,"data_offsets":[0,4]}}') + b"\x00" * 4,
    _frame(b'{"a":"x"}'),
])
def test_hostile_headers_are_wire_format_errors(body):
    with pytest.raises(WireFormatError):
        decode_tensors(body, {"a": (1,)})


def test_random_mutations_only_ever_raise_wire_format_errors():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    valid = encode_tensors({"a": torch.ones(3), "b": torch.zeros(2, 2)}, {"round": 1})

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)),
                    max_size=8), st.integers(0, len(valid)))
    def check(flips, cut):
        data = bytearray(valid[:max(cut, 1)] if cut < len(valid) else valid)
        for pos, value in flips:
            if pos < len(data):
                data[pos] = value
        try:
            out, _ = decode_tensors(bytes(data), {"a": (3,), "b": (2, 2)})
        except WireFormatError:
            return
        assert set(out) == {"a", "b"} and torch.isfinite(out["a"]).all()

    check()
