"""Uploads are untrusted: every malformed body is refused with a JSON error, nothing is kept."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from feddiffuse.hub import Hub
from feddiffuse.hub.errors import HubError
from feddiffuse.hub.uploads import UploadReceiver
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import UploadReceipt
from feddiffuse.shared.wire import sha256_hex


@pytest.fixture
def open_round(tmp_path, kit):
    """A full-method round with alice and bob; alice's valid delta, not yet sent."""
    setup = kit.make_hub(tmp_path / "hub", rounds=2, clients=("alice", "bob"))
    hub = Hub.open(setup.root, serve=True)
    http = kit.test_client(hub)
    sent = kit.participate(http, "alice", setup.tokens["alice"], upload=False)
    yield setup, hub, http, sent
    hub.close()


def _f16(deltas, meta):
    tensors = {n: t.half() for n, t in deltas.items()}
    return st_save(tensors, metadata={f"feddiffuse.{k}": str(v) for k, v in meta.items()})


def _variants(kit, sent):
    m, d, n = sent.manifest, sent.deltas, sent.num_samples
    first = next(iter(d))
    meta = {"kind": "delta", "preset": "tiny", "round": 1, "base_version": m.global_version,
            "num_samples": n, "segments": "encoder,bottleneck,decoder", "codec": "fp32"}

    def with_value(v):
        t = dict(d)
        t[first] = t[first].clone()
        t[first].view(-1)[-1] = v
        return kit.encode_delta(t, m, n)

    reshaped = dict(d)
    reshaped[first] = d[first].reshape(-1)[:-1]
    extra = {**d, "bogus.weight": torch.zeros(3)}
    missing = {k: v for k, v in d.items() if k != first}
    decoder = {k: v for k, v in d.items() if k.startswith(("ups", "final_conv"))}
    body = sent.body
    return {
        "nan": (with_value(float("nan")), 422, "NaN"),
        "inf": (with_value(float("inf")), 422, "NaN or infinite"),
        "wrong shape": (kit.encode_delta(reshaped, m, n), 422, "shape"),
        "float16": (_f16(d, meta), 422, "F32"),
        "extra tensor": (kit.encode_delta(extra, m, n), 422, "names"),
        "missing tensor": (kit.encode_delta(missing, m, n), 422, "names"),
        "wrong segments": (kit.encode_delta(decoder, m, n, segments="decoder"), 409,
                           "asks alice for encoder+bottleneck+decoder"),
        "segments metadata": (kit.encode_delta(d, m, n, segments="decoder"), 409, "says"),
        "stale base": (kit.encode_delta(d, m, n, base_version="0" * 64), 409, "relative"),
        "other round": (kit.encode_delta(d, m, n, round=2), 422, "round"),
        "zero samples": (kit.encode_delta(d, m, 0), 422, "num_samples"),
        "negative samples": (kit.encode_delta(d, m, -4), 422, "num_samples"),
        "text samples": (kit.encode_delta(d, m, "many"), 422, "num_samples"),
        "no samples": (kit.encode_delta(d, m, None), 422, "lacks"),
        "nan loss": (kit.encode_delta(d, m, n, mean_loss="nan"), 422, "mean_loss"),
        "global kind": (kit.encode_delta(d, m, n, kind="global"), 422, "not a delta"),
        "other preset": (kit.encode_delta(d, m, n, preset="paper-fmnist"), 422, "preset"),
        "truncated": (body[:-100], 422, "ended"),
        "trailing bytes": (body + b"\x00\x00\x00\x00", 422, "past the end"),
        "over the cap": (body + b"\x00" * (1 << 20), 413, "more than"),
        "huge header": (struct.pack("<Q", 1 << 40) + b"{}", 413, "header"),
        "bad json": (struct.pack("<Q", 16) + b"not json at all!", 422, "JSON"),
        "json list": (struct.pack("<Q", 8) + b"[1,2,3] ", 422, "object"),
        "empty": (b"", 422, "ended after 0 bytes"),
        "offsets overlap": (_overlapping(body), 422, "overlap"),
    }


def _overlapping(body: bytes) -> bytes:
    import json

    n = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = next((x, y) for x in names for y in names
                if x != y and header[x]["shape"] == header[y]["shape"])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body[8 + n:]


def test_malformed_uploads_are_refused_and_leave_nothing(open_round, kit):
    setup, hub, http, sent = open_round
    for label, (body, status, words) in _variants(kit, sent).items():
        r = http.put(f"{A}/rounds/1/update", content=body, headers=setup.auth("alice"))
        assert r.status_code == status, (label, r.text)
        payload = r.json()
        assert set(payload) == {"code", "message"}, label
        assert words in payload["message"], (label, payload)
        assert kit.temp_files(setup.root) == [], label
    assert hub.store.uploads(1) == []
    pickled = io.BytesIO()
    torch.save(sent.deltas, pickled)  # a pickle is never unpickled: it is not safetensors
    r = http.put(f"{A}/rounds/1/update", content=pickled.getvalue(), headers=setup.auth("alice"))
    assert r.status_code in (413, 422) and r.json()["code"] in ("too_large", "invalid_upload")
    r = http.put(f"{A}/rounds/1/update", content=sent.body, headers={
        **setup.auth("alice"), "X-Content-SHA256": "ab" * 32})
    assert r.status_code == 422 and "damaged" in r.json()["message"]
    # After all that, the honest upload is accepted.
    r = http.put(f"{A}/rounds/1/update", content=sent.body, headers={
        **setup.auth("alice"), "X-Content-SHA256": sha256_hex(sent.body)})
    assert r.status_code == 200, r.text
    blobs = {p.name for p in (setup.root / "blobs").iterdir()}
    assert f"{sha256_hex(sent.body)}.safetensors" in blobs


def test_resending_is_idempotent_and_replacing_is_refused(open_round, kit):
    setup, hub, http, sent = open_round
    alice = setup.auth("alice")
    first = http.put(f"{A}/rounds/1/update", content=sent.body, headers=alice)
    again = http.put(f"{A}/rounds/1/update", content=sent.body, headers=alice)
    assert first.status_code == again.status_code == 200
    assert UploadReceipt.model_validate_json(first.content) == \
        UploadReceipt.model_validate_json(again.content)
    other = kit.encode_delta(sent.deltas, sent.manifest, sent.num_samples + 1)
    r = http.put(f"{A}/rounds/1/update", content=other, headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    kit.participate(http, "bob", setup.tokens["bob"])  # round 1 closes, round 2 opens
    assert hub.store.round(1).status == "closed"
    late = http.put(f"{A}/rounds/1/update", content=sent.body, headers=alice)
    assert late.status_code == 200 and late.json() == first.json()  # a retry still gets it
    r = http.put(f"{A}/rounds/1/update", content=other, headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "round_closed"
    r = http.put(f"{A}/rounds/9/update", content=other, headers=alice)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    for c, t in setup.tokens.items():
        kit.participate(http, c, t)
    r = http.put(f"{A}/rounds/2/update", content=other, headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "round_closed"
    r = http.put(f"{A}/rounds/3/update", content=other, headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "federation_finished"


def test_closed_round_refuses_a_first_upload(open_round, kit):
    setup, hub, http, sent = open_round
    setup.tokens["carol"] = kit.enrol(setup.root, "carol")
    for c in ("alice", "bob"):
        kit.participate(http, c, setup.tokens[c])
    r = http.put(f"{A}/rounds/1/update", content=sent.body, headers=setup.auth("carol"))
    assert r.status_code == 409 and r.json()["code"] == "round_closed"


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 4096, 1 << 20])
def test_the_receiver_accepts_any_chunking(open_round, chunk):
    setup, hub, http, sent = open_round
    ticket = hub.prepare_upload("alice", 1)
    body = sent.body if chunk >= 4096 else sent.body[: 60_000]
    receiver = UploadReceiver(ticket, hub.blobs, hub.layout)
    for i in range(0, len(body), chunk):
        receiver.feed(body[i:i + chunk])
    if body is sent.body:
        received = receiver.finish()
        assert received.sha256 == sha256_hex(body) and received.num_samples == sent.num_samples
        hub.commit_upload(ticket, received)
        assert hub.store.upload(1, "alice").sha256 == received.sha256
    else:
        with pytest.raises(HubError, match="ended"):
            receiver.finish()
    assert kit_free_of_temps(setup.root)


def kit_free_of_temps(root) -> bool:
    return not list((root / "blobs").glob(".tmp-*"))


def test_a_non_finite_value_split_across_chunks_is_caught(open_round, kit):
    setup, hub, http, sent = open_round
    d = {n: t.clone() for n, t in sent.deltas.items()}
    last = list(d)[-1]
    d[last].view(-1)[-1] = float("inf")
    body = kit.encode_delta(d, sent.manifest, sent.num_samples)
    receiver = UploadReceiver(hub.prepare_upload("alice", 1), hub.blobs, hub.layout)
    split = len(body) - 2  # the last float arrives in two pieces
    receiver.feed(body[:split])
    receiver.feed(body[split:])
    with pytest.raises(HubError, match="infinite"):
        receiver.finish()
    assert kit_free_of_temps(setup.root)


def test_receiving_does_not_hold_the_body_in_memory(open_round):
    import tracemalloc

    setup, hub, http, sent = open_round
    receiver = UploadReceiver(hub.prepare_upload("alice", 1), hub.blobs, hub.layout)
    chunk = 1 << 16
    tracemalloc.start()
    try:
        for i in range(0, len(sent.body), chunk):
            receiver.feed(sent.body[i:i + chunk])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    received = receiver.finish()
    assert received.bytes == len(sent.body) > 4_000_000
    assert peak < 600_000  # a few chunks' worth, not the 4 MB body
    received.temp.discard()
