"""Against a real uvicorn server on loopback, with httpx: rounds, deadlines, streaming, TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from feddiffuse.hub import Hub
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import UploadReceipt
from feddiffuse.shared.wire import sha256_hex


def _chunks(body: bytes, size: int = 1 << 16):
    for i in range(0, len(body), size):
        yield body[i:i + size]


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_a_full_round_over_loopback(tmp_path, kit, method):
    setup = kit.make_hub(tmp_path / "hub", method=method, rounds=1)
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            fed, _, _ = kit.db_round(setup.root, 1)
            base = kit.blob_state(setup.root, fed.current_version)
            sent = {}
            for c, t in setup.tokens.items():
                s = kit.participate(http, c, t, upload=False)
                # Streamed like the edge client does: chunks, a Content-Length, a sha256.
                r = http.put(f"{A}/rounds/1/update", content=_chunks(s.body), headers={
                    "Authorization": f"Bearer {t}", "Content-Length": str(len(s.body)),
                    "X-Content-SHA256": sha256_hex(s.body)})
                assert r.status_code == 200, r.text
                assert UploadReceipt.model_validate_json(r.content).bytes == len(s.body)
                sent[c] = s
            expected = kit.reference(base, method, 1, 0, sorted(sent), sent)
            kit.wait_until(lambda: kit.db_round(setup.root, 1)[1].status == "closed",
                           "round 1 closed")
            fed, row, _ = kit.db_round(setup.root, 1)
            assert fed.finished and row.result_version == kit.reference_version(
                expected, "tiny", 1)
            assert kit.manifest(http, setup.tokens["alice"]).phase == "finished"


def test_concurrent_uploads_are_all_accepted(tmp_path, kit):
    clients = tuple(f"c{i}" for i in range(8))
    setup = kit.make_hub(tmp_path / "hub", clients=clients)
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        base = kit.blob_state(setup.root, kit.db_round(setup.root, 1)[0].current_version)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            prepared = {c: kit.participate(http, c, t, upload=False)
                        for c, t in setup.tokens.items()}

            def send(c: str) -> int:
                with httpx.Client(base_url=server.url, timeout=60) as own:
                    return own.put(f"{A}/rounds/1/update", content=_chunks(prepared[c].body),
                                   headers={"Authorization": f"Bearer {setup.tokens[c]}"}
                                   ).status_code

            with ThreadPoolExecutor(len(clients)) as pool:
                assert list(pool.map(send, clients)) == [200] * len(clients)
        expected = kit.reference(base, "full", 1, 0, list(clients), prepared)
        def closed():
            row = kit.db_round(setup.root, 1)[1]
            return row if row.status == "closed" else None

        row = kit.wait_until(closed, "round 1 closed")
        got = kit.blob_state(setup.root, row.result_version)
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_the_deadline_closes_a_round_with_no_request_arriving(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", timeout=1.0, rounds=2, clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub, tick_interval=0.1) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            kit.participate(http, "alice", setup.tokens["alice"])
        # No request from here on: the app's background task must close the round.
        kit.wait_until(lambda: kit.db_round(setup.root, 1)[1].status == "closed",
                       "the round closed at its deadline", timeout=20)
        fed, row, uploads = kit.db_round(setup.root, 1)
        assert [u.client for u in uploads] == ["alice"] and fed.current_round == 2


def test_an_oversized_streamed_upload_gets_413(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub, kit.serve(hub) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            s = kit.participate(http, "alice", setup.tokens["alice"], upload=False)
            auth = {"Authorization": f"Bearer {setup.tokens['alice']}"}
            oversized = s.body + b"\x00" * 300_000
            r = http.put(f"{A}/rounds/1/update", content=_chunks(oversized), headers=auth)
            assert r.status_code == 413 and r.json()["code"] == "too_large"
            r = http.put(f"{A}/rounds/1/update", content=oversized, headers=auth)
            assert r.status_code == 413 and r.json()["code"] == "too_large"
            assert kit.temp_files(setup.root) == []
            r = http.put(f"{A}/rounds/1/update", content=_chunks(s.body), headers=auth)
            assert r.status_code == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path, kit):
    import uvicorn

    from feddiffuse.hub import create_app

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    setup = kit.make_hub(tmp_path / "hub")
    with Hub.open(setup.root, serve=True) as hub:
        import socket
        import threading

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(hub), ssl_certfile=str(cert), ssl_keyfile=str(key),
                                log_config=None, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            def started() -> bool:  # a server that cannot start fails, never hangs
                assert thread.is_alive(), "no TLS server"
                return server.started

            kit.wait_until(started, "the TLS server started", timeout=60)
            url = f"https://127.0.0.1:{sock.getsockname()[1]}"
            context = ssl.create_default_context(cafile=str(cert))
            with httpx.Client(base_url=url, verify=context) as http:
                assert kit.manifest(http, setup.tokens["alice"]).phase == "open"
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}{A}/health")  # an unknown certificate is refused
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
