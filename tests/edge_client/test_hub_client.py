"""The HTTP client against the fake hub: typed answers, resumable downloads, error mapping."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from edge_fakehub import FakeHub

from feddiffuse.edge_client.backoff import Backoff, call_with_retry
from feddiffuse.edge_client.errors import (
    DownloadCorrupt,
    HubRejected,
    HubUnavailable,
    RoundMovedOn,
    TokenRejected,
)
from feddiffuse.edge_client.hub_client import HubClient
from feddiffuse.shared.wire import decode_tensors


def client_for(hub: FakeHub, token: str = "token-client-a") -> HubClient:
    return HubClient("http://hub.test", token, transport=hub.transport())


def test_federation_and_manifest(fake_hub):
    with client_for(fake_hub) as c:
        info = c.federation()
        m = c.manifest()
    assert info.name == "fake" and info.parameters["total"] > 0
    assert m.client_id == "client-a" and m.phase == "open" and m.round == 1
    assert m.download_segments == ["encoder", "bottleneck", "decoder"]


def test_download_is_verified_and_resumed_after_a_cut(fake_hub, tmp_path):
    dest = tmp_path / "dl" / "model.safetensors"
    fake_hub.faults.cut_downloads = 1
    seen = []
    with client_for(fake_hub) as c:
        with pytest.raises(HubUnavailable, match="cut off"):
            c.download_model(fake_hub.version, ["decoder"], dest)
        part = dest.with_name(dest.name + ".part")
        assert part.is_file() and part.stat().st_size > 0 and not dest.exists()
        digest = c.download_model(fake_hub.version, ["decoder"], dest,
                                  on_progress=lambda d, t: seen.append((d, t)))
    assert any(entry.startswith("range ") for entry in fake_hub.faults.log)
    data = dest.read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    tensors, _ = decode_tensors(data)
    assert tensors and all(n.startswith(("ups", "final_conv")) for n in tensors)
    assert seen[-1][0] == seen[-1][1] == len(data)


def test_download_with_a_wrong_checksum_starts_over(fake_hub, tmp_path, monkeypatch):
    dest = tmp_path / "m.safetensors"
    original = fake_hub._download

    def tampered(request, version):
        response = original(request, version)
        response.headers["X-Content-SHA256"] = "0" * 64
        return response

    monkeypatch.setattr(fake_hub, "_download", tampered)
    with client_for(fake_hub) as c, pytest.raises(DownloadCorrupt):
        c.download_model(fake_hub.version, ["decoder"], dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


@pytest.mark.parametrize("token, revoked", [("wrong", False), ("token-client-a", True)])
def test_bad_tokens_are_rejected_in_one_sentence(fake_hub, token, revoked):
    if revoked:
        fake_hub.revoked.add(token)
    with client_for(fake_hub, token) as c, pytest.raises(TokenRejected) as err:
        c.manifest()
    assert "wrong or has been revoked" in str(err.value)
    assert err.value.status in (401, 403)


def test_error_mapping(fake_hub):
    with client_for(fake_hub) as c:
        with pytest.raises(RoundMovedOn):
            c.upload_update(7, b"whatever")
        with pytest.raises(HubRejected) as err:
            c.upload_update(1, b"not safetensors")
        assert err.value.status == 422 and not isinstance(err.value, RoundMovedOn)
        fake_hub.faults.errors_503 = 1
        with pytest.raises(HubUnavailable, match="503"):
            c.manifest()
        fake_hub.faults.refuse = 1
        with pytest.raises(HubUnavailable, match="connection refused"):
            c.manifest()


def test_retry_with_backoff_until_the_hub_answers(fake_hub):
    fake_hub.faults.refuse = 2
    fake_hub.faults.errors_503 = 2
    retries = []
    with client_for(fake_hub) as c:
        m = call_with_retry(c.manifest, what="asking", backoff=Backoff(initial=0.001,
                                                                         maximum=0.002),
                            on_retry=lambda *a: retries.append(a))
    assert m.round == 1 and len(retries) == 4
    assert [a[1] for a in retries] == [1, 2, 3, 4]


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    import random

    b = Backoff(initial=1, factor=2, maximum=10, jitter=0.5)
    rng = random.Random(0)
    delays = [b.delay(i, rng) for i in range(1, 8)]
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert all(5 <= d <= 10 for d in delays[4:])
    limited = Backoff(initial=0.001, max_attempts=2)
    calls = []

    def fail():
        calls.append(1)
        raise HubUnavailable("down")

    with pytest.raises(HubUnavailable):
        call_with_retry(fail, what="x", backoff=limited)
    assert len(calls) == 2


def test_an_injected_httpx_client_is_used_as_is(fake_hub):
    http = httpx.Client(transport=fake_hub.transport())
    c = HubClient("http://hub.test/", "token-client-b", http=http)
    assert c.manifest().client_id == "client-b"
    c.close()
    assert not http.is_closed
