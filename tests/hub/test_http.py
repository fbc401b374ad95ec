"""The HTTP surface in-process: auth, downloads (ETag, Range), OpenAPI, and no 500s."""

from __future__ import annotations

import pytest

from feddiffuse.hub import Hub
from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import HubStatus
from feddiffuse.shared.wire import decode_tensors, sha256_hex


@pytest.fixture
def served(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="udec", rounds=2, clients=("alice", "bob"))
    hub = Hub.open(setup.root, serve=True)
    yield setup, hub, kit.test_client(hub)
    hub.close()


def _is_error(r, status: int, code: str) -> bool:
    return r.status_code == status and r.json()["code"] == code and r.json()["message"]


def test_tokens_are_checked(served, kit):
    setup, hub, http = served
    r = http.get(f"{A}/manifest")
    assert _is_error(r, 401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
    assert _is_error(http.get(f"{A}/manifest", headers={"Authorization": "Bearer nope"}),
                     401, "unauthorized")
    assert _is_error(http.get(f"{A}/manifest", headers={"Authorization": "Basic eDp5"}),
                     401, "unauthorized")
    assert _is_error(http.get(f"{A}/manifest", headers=setup.auth("admin")), 403, "forbidden")
    assert _is_error(http.get(f"{A}/admin/status", headers=setup.auth("alice")), 403,
                     "forbidden")
    assert http.get(f"{A}/federation", headers=setup.auth("admin")).status_code == 200
    hub.revoke_token("bob")
    assert _is_error(http.get(f"{A}/federation", headers=setup.auth("bob")), 403, "forbidden")
    assert http.get(f"{A}/health").json() == {"status": "ok", "protocol": 1}


def test_downloads_have_etag_range_and_hash(served):
    setup, hub, http = served
    auth = setup.auth("alice")
    version = hub.store.federation().current_version
    url = f"{A}/models/{version}"
    full = http.get(url, headers=auth)
    assert full.status_code == 200 and sha256_hex(full.content) == version
    etag = f'"{version}:{",".join(SEGMENTS)}"'
    assert full.headers["etag"] == etag and full.headers["x-content-sha256"] == version
    assert full.headers["accept-ranges"] == "bytes"
    same = http.get(url, params={"segments": "decoder,encoder,bottleneck"}, headers=auth)
    assert same.content == full.content and same.headers["etag"] == etag
    size = len(full.content)

    r = http.get(url, headers={**auth, "If-None-Match": f"W/{etag}"})
    assert r.status_code == 304 and r.content == b""
    r = http.get(url, headers={**auth, "Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == full.content[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{size}"
    assert r.headers["x-content-sha256"] == version  # of the whole file, to verify at the end
    r = http.get(url, headers={**auth, "Range": "bytes=100-", "If-Range": etag})
    assert r.status_code == 206 and r.content == full.content[100:]
    r = http.get(url, headers={**auth, "Range": "bytes=100-", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == full.content
    r = http.get(url, headers={**auth, "Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == full.content[-10:]
    r = http.get(url, headers={**auth, "Range": f"bytes={size}-"})
    assert _is_error(r, 416, "range_not_satisfiable")
    assert r.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-6", "bytes=9-2", "items=0-3", "bytes=x-y"):
        r = http.get(url, headers={**auth, "Range": ignored})
        assert r.status_code == 200 and len(r.content) == size, ignored
    head = http.head(url, headers=auth)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size

    dec = http.get(url, params={"segments": "decoder"}, headers=auth)
    assert dec.status_code == 200
    assert dec.headers["etag"] == f'"{version}:decoder"'
    assert dec.headers["x-content-sha256"] == sha256_hex(dec.content)
    tensors, meta = decode_tensors(dec.content)
    whole, _ = decode_tensors(full.content)
    assert meta["feddiffuse.version"] == version and meta["feddiffuse.segments"] == "decoder"
    assert set(tensors) == {n for n in whole if n.startswith(("ups", "final_conv"))}
    assert http.get(url, params={"segments": "decoder"}, headers=auth).content == dec.content

    st = HubStatus.model_validate_json(http.get(f"{A}/admin/status",
                                                headers=setup.auth("admin")).content)
    served_bytes = 3 * size + 100 + (size - 100) + 10 + 4 * size + 2 * len(dec.content)
    assert st.current.bytes_out == served_bytes


def test_udec_round_two_sends_only_the_decoder(served, kit):
    setup, hub, http = served
    for c, t in setup.tokens.items():
        kit.participate(http, c, t)
    m = kit.manifest(http, setup.tokens["alice"])
    assert m.round == 2 and m.download_segments == ["decoder"]
    received = kit.download(http, setup.tokens["alice"], m)
    assert all(n.startswith(("ups", "final_conv")) for n in received)


MALFORMED = [
    ("GET", "/", {}, None),
    ("GET", f"{A}/nothing", {}, None),
    ("DELETE", f"{A}/manifest", {}, None),
    ("PATCH", f"{A}/rounds/1/update", {}, None),
    ("GET", f"{A}/models/zzz", {}, None),
    ("GET", f"{A}/models/{'0' * 64}", {}, None),
    ("GET", f"{A}/models/%00%ff", {}, None),
    ("GET", f"{A}/models/VERSION?segments=foo", {}, None),
    ("GET", f"{A}/models/VERSION?segments={'x' * 5000}", {}, None),
    ("GET", f"{A}/models/VERSION", {"Range": "bytes=-0"}, None),
    ("GET", f"{A}/models/VERSION", {"Range": "bytes=99999999999999999999999-"}, None),
    ("GET", f"{A}/models/VERSION", {"If-None-Match": "\x01\x02"}, None),
    ("PUT", f"{A}/rounds/abc/update", {}, b"x"),
    ("PUT", f"{A}/rounds/0/update", {}, b"x"),
    ("PUT", f"{A}/rounds/-1/update", {}, b"x"),
    ("PUT", f"{A}/rounds/99999999999999999999999/update", {}, b"x"),
    ("PUT", f"{A}/rounds/1/update", {"Content-Type": "application/json"}, b'{"a": 1}'),
    ("PUT", f"{A}/rounds/1/update", {"X-Content-SHA256": b"\xe9\xff"}, b"\x08" + b"\x00" * 7),
    ("POST", f"{A}/admin/rounds/current/extend", {"Content-Type": "application/json"},
     b"not json"),
    ("POST", f"{A}/admin/rounds/current/extend", {"Content-Type": "text/plain"}, b"5"),
    ("POST", f"{A}/admin/rounds/current/extend", {"Content-Type": "application/json"},
     b'{"seconds": 1e400}'),
    ("POST", f"{A}/admin/rounds/current/extend", {"Content-Type": "application/json"},
     b"[" * 10000),
    ("GET", f"{A}/manifest", {"Authorization": "Bearer"}, None),
    ("GET", f"{A}/manifest", {"Authorization": b"Bearer \xff\xfe"}, None),
    ("GET", f"{A}/manifest", {"Authorization": "x" * 10000}, None),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), MALFORMED)
def test_malformed_requests_get_a_json_error_never_a_500(served, method, path, headers, body):
    setup, hub, http = served
    version = hub.store.federation().current_version
    who = "admin" if "/admin/" in path else "alice"
    all_headers = {**setup.auth(who), **headers} if "Authorization" not in headers else headers
    r = http.request(method, path.replace("VERSION", version), headers=all_headers,
                     content=body)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        payload = r.json()
        assert set(payload) == {"code", "message"} and payload["message"]
    else:  # a malformed optional header is ignored, as HTTP wants
        assert "If-None-Match" in headers


def test_openapi_describes_the_protocol(served):
    setup, hub, http = served
    spec = http.get(f"{A}/openapi.json").json()
    paths = set(spec["paths"])
    assert {f"{A}/federation", f"{A}/manifest", f"{A}/models/{{version}}",
            f"{A}/rounds/{{round_index}}/update", f"{A}/admin/status",
            f"{A}/admin/rounds/current/close", f"{A}/admin/rounds/current/extend"} <= paths
    assert "ErrorBody" in spec["components"]["schemas"]
