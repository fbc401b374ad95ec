"""Fixtures for the hub's tests: hub directories, fake participants, servers, a fake clock.

Helpers live on the `kit` fixture (pytest's importlib mode does not let test modules import
a helper module from this folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.net import free_port, wait_healthy
from support.wait import poll_until

from feddiffuse.hub import FederationSettings, Hub, create_app, init_hub
from feddiffuse.hub.backends import Backends, open_hub_store
from feddiffuse.hub.limits import ServeLimits
from feddiffuse.hub.server import uvicorn_config
from feddiffuse.hub.tokens import create_client_token
from feddiffuse.hub.weights import encode_global
from feddiffuse.shared.model import segment_of
from feddiffuse.shared.protocol import API_PREFIX, Manifest, UploadReceipt
from feddiffuse.shared.rounds import RoundState
from feddiffuse.shared.wire import decode_tensors, encode_tensors, sha256_hex

A = API_PREFIX


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class HubSetup:
    root: Path
    admin: str
    tokens: dict[str, str]
    settings: FederationSettings

    def auth(self, name: str) -> dict[str, str]:
        token = self.admin if name == "admin" else self.tokens[name]
        return {"Authorization": f"Bearer {token}"}


@dataclass
class Sent:
    """What a fake participant sent in a round."""

    manifest: Manifest
    deltas: dict[str, torch.Tensor] = field(repr=False)
    num_samples: int
    body: bytes = field(repr=False)
    receipt: UploadReceipt | None = None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Kit:
    FakeClock = FakeClock

    # -- hubs ---------------------------------------------------------------------------------

    def make_hub(self, root: Path, *, preset: str = "tiny", method: str = "full",
                 rounds: int = 1, local_epochs: int = 1, min_clients: int = 1,
                 timeout: float | None = None, seed: int = 0,
                 clients: tuple[str, ...] = ("alice", "bob", "carol"),
                 recipe: str | dict | None = None, uplink_codec: str = "fp32",
                 downlink_codec: str = "fp32",
                 backends: Backends | None = None) -> HubSetup:
        settings = FederationSettings(name="test", preset=preset, method=method, rounds=rounds,
                                      local_epochs=local_epochs, min_clients=min_clients,
                                      round_timeout_s=timeout, seed=seed,
                                      uplink_codec=uplink_codec, downlink_codec=downlink_codec,
                                      **({} if recipe is None else {"recipe": recipe}))
        admin, _ = init_hub(root, settings, backends=backends)
        return HubSetup(root, admin, {c: self.enrol(root, c) for c in clients}, settings)

    def enrol(self, root: Path, name: str) -> str:
        store = open_hub_store(root)
        try:
            return create_client_token(store, name)
        finally:
            store.close()

    def db_round(self, root: Path, r: int):
        store = open_hub_store(root)
        try:
            return store.federation(), store.round(r), store.uploads(r)
        finally:
            store.close()

    def blob_state(self, root: Path, sha: str) -> dict[str, torch.Tensor]:
        return load_file(root / "blobs" / f"{sha}.safetensors")

    def temp_files(self, root: Path) -> list[Path]:
        return sorted((root / "blobs").glob(".tmp-*"))

    # -- fake participants --------------------------------------------------------------------

    def delta(self, shapes: Mapping[str, tuple[int, ...]], client: str, r: int,
              scale: float = 0.01) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(f"{client}:{r}".encode()))
        return {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}

    def encode_delta(self, deltas: Mapping[str, torch.Tensor], m: Manifest,
                     num_samples: int | None, **meta: object) -> bytes:
        metadata = {"kind": "delta", "preset": m.preset, "round": m.round,
                    "base_version": m.global_version, "num_samples": num_samples,
                    "segments": ",".join(m.upload_segments), "mean_loss": 0.25, **meta}
        return encode_tensors(deltas, {k: v for k, v in metadata.items() if v is not None})

    def manifest(self, http, token: str) -> Manifest:
        r = http.get(f"{A}/manifest", headers=bearer(token))
        assert r.status_code == 200, r.text
        return Manifest.model_validate_json(r.content)

    def download(self, http, token: str, m: Manifest) -> dict[str, torch.Tensor]:
        r = http.get(f"{A}/models/{m.global_version}",
                     params={"segments": ",".join(m.download_segments)}, headers=bearer(token))
        assert r.status_code == 200, r.text
        assert r.headers["x-content-sha256"] == sha256_hex(r.content)
        tensors, _ = decode_tensors(r.content, require_finite=False)
        return tensors

    def participate(self, http, name: str, token: str, *, num_samples: int | None = None,
                    upload: bool = True) -> Sent:
        """One client's round: manifest, download, 'train', upload its assigned segments."""
        m = self.manifest(http, token)
        assert m.phase == "open", m
        received = self.download(http, token, m)
        # Sorted: the decoder's order varies, and the deltas must not (the replica tests
        # send the same uploads to two hubs).
        shapes = {n: tuple(t.shape) for n, t in sorted(received.items())
                  if segment_of(n) in m.upload_segments}
        deltas = self.delta(shapes, name, m.round)
        n = num_samples if num_samples is not None else 10 + len(name)
        body = self.encode_delta(deltas, m, n)
        sent = Sent(m, deltas, n, body)
        if upload:
            r = http.put(f"{A}/rounds/{m.round}/update", content=body, headers=bearer(token))
            assert r.status_code == 200, r.text
            sent.receipt = UploadReceipt.model_validate_json(r.content)
            assert sent.receipt.sha256 == sha256_hex(body)
        return sent

    def reference(self, base: Mapping[str, torch.Tensor], method: str, r: int, seed: int,
                  participants: list[str], sent: Mapping[str, Sent]) -> dict[str, torch.Tensor]:
        """The in-memory FedAvg of the same uploads (the shared core, no hub)."""
        seg_of = {n: segment_of(n) for n in base}
        state = RoundState.open(method, r, participants, base, seg_of, seed)
        for c in sorted(sent):
            state.accept(c, sent[c].deltas, sent[c].num_samples, len(sent[c].body))
        return state.finalize().global_state

    def reference_version(self, state: Mapping[str, torch.Tensor], preset: str, r: int) -> str:
        return sha256_hex(encode_global(state, preset, r + 1))

    # -- servers ------------------------------------------------------------------------------

    def test_client(self, hub: Hub):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from starlette.testclient import TestClient

            return TestClient(create_app(hub))

    def serve(self, hub: Hub, tick_interval: float = 0.2,
              limits: ServeLimits | None = None) -> ThreadServer:
        """A real uvicorn server for `hub` (with the connection limits `serve` applies); use
        it in a `with` inside the hub's own."""
        return ThreadServer(hub, tick_interval, limits)

    def wait_until(self, condition, what: str, timeout: float = 30.0):
        """Poll `condition` until it returns something true (returned); fail, saying `what`
        never happened, after `timeout` seconds (a bound for a stuck hub, not a speed)."""
        return poll_until(condition, what, timeout, interval=0.02)

    def free_port(self) -> int:
        return free_port()


@pytest.fixture
def kit() -> Kit:
    return Kit()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backends(request) -> Backends:
    """The hub's state in SQLite (its directory), then in PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        return Backends()
    return Backends(store=request.getfixturevalue("pg_url"))


@pytest.fixture(params=["embedded", "postgresql+s3"])
def hub_backends(request) -> Backends:
    """A whole hub: embedded (SQLite and its blob folder), then PostgreSQL and an S3 bucket
    (a fresh database and bucket on the session's servers)."""
    if request.param == "embedded":
        return Backends()
    s3 = request.getfixturevalue("s3_server")
    return Backends(store=request.getfixturevalue("pg_url"),
                    blobs=f"s3://{request.getfixturevalue('s3_bucket')}/hub",
                    s3_endpoint=s3.endpoint)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class ThreadServer:
    """A real uvicorn server on a loopback socket, in a thread of the test process, configured
    as `feddiffuse-hub serve` configures it."""

    def __init__(self, hub: Hub, tick_interval: float = 0.2,
                 limits: ServeLimits | None = None) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.limits = limits or ServeLimits()
        self.app = create_app(hub, tick_interval=tick_interval, limits=self.limits)
        config = uvicorn_config(self.app, self.limits, log_config=None, access_log=False,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        poll_until(self._started, "uvicorn started", timeout=30, interval=0.02)
        return self

    def _started(self) -> bool:
        if not self.thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        return self.server.started

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


class HubProcess:
    """`feddiffuse-hub serve` in a subprocess on a free loopback port (for kill -9 tests)."""

    def __init__(self, root: Path, port: int, log: Path, env: Mapping[str, str] | None = None):
        exe = shutil.which("feddiffuse-hub") or str(Path(sys.prefix) / "bin" / "feddiffuse-hub")
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        full_env = {**os.environ, **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([exe, "serve", str(root), "--port", str(port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 90.0) -> HubProcess:
        wait_healthy(f"{self.url}{A}/health", proc=self.proc, log=self.log, timeout=timeout)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator:
    procs: list[HubProcess] = []

    def start(root: Path, env: Mapping[str, str] | None = None, wait: bool = True
              ) -> HubProcess:
        p = HubProcess(root, Kit().free_port(), tmp_path / f"hub-{len(procs)}.log", env)
        procs.append(p)
        return p.wait_ready() if wait else p

    yield start
    for p in procs:
        p.stop()
