"""A real feddiffuse-hub on loopback for the client's integration tests.

The hub directory is made with the hub's public API (init_hub, Hub.create_token). It is served
either by `feddiffuse-hub serve` in a subprocess (which tests can kill and restart) or by
uvicorn in a thread of the test process (faster to start). What the hub received is read back
from its store and blob folder.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
from support.net import free_port, wait_healthy
from support.wait import poll_until

from feddiffuse.shared.protocol import API_PREFIX, HubStatus
from feddiffuse.shared.wire import read_header


def quiet_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    if home is not None:
        env["FEDDIFFUSE_HOME"] = str(home)
    return env


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class Received:
    round: int
    client: str
    segments: tuple[str, ...]
    names: set[str]
    metadata: dict[str, str]


class RealHub:
    def __init__(self, root: Path, *, method: str, clients: tuple[str, ...] = ("alice", "bob"),
                 rounds: int = 2, local_epochs: int = 1, batch_size: int = 8,
                 min_clients: int | None = None, round_timeout: float | None = None,
                 recipe: str | dict = "fast") -> None:
        from feddiffuse.hub import FederationSettings, Hub, init_hub

        self.root = root
        self.method = method
        settings = FederationSettings(
            name="edge-test", preset="tiny", method=method, rounds=rounds,
            local_epochs=local_epochs, min_clients=min_clients or len(clients),
            round_timeout_s=round_timeout, seed=0, batch_size=batch_size, lr=1e-3,
            recipe=recipe)
        self.admin, _version = init_hub(root, settings)
        with Hub.open(root) as hub:
            self.tokens = {c: hub.create_token(c) for c in clients}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._hub = None
        self.log = root.parent / f"{root.name}-serve.log"
        self._verify: ssl.SSLContext | bool = True

    # -- serving ------------------------------------------------------------------------------

    def start(self, wait: bool = True, tls: tuple[Path, Path, Path] | None = None) -> RealHub:
        """Serve in a subprocess (`feddiffuse-hub serve`); with `tls` = (certificate, key, the
        CA that signed it), over HTTPS."""
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        extra: list[str] = []
        if tls is not None:
            extra = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
            self.url = f"https://127.0.0.1:{self.port}"
            self._verify = ssl.create_default_context(cafile=str(tls[2]))
        self.proc = subprocess.Popen(
            [script("feddiffuse-hub"), "serve", str(self.root), "--port", str(self.port),
             "--log-level", "warning", *extra], stdout=out, stderr=subprocess.STDOUT,
            env=quiet_env(), start_new_session=True)
        out.close()
        if wait:
            self.wait_ready()
        return self

    def start_in_thread(self, tick_interval: float = 0.2) -> RealHub:
        """Serve with uvicorn in a thread of this process."""
        import uvicorn

        from feddiffuse.hub import Hub, create_app

        self._hub = Hub.open(self.root, serve=True)
        config = uvicorn.Config(create_app(self._hub, tick_interval=tick_interval),
                                host="127.0.0.1", port=self.port, log_level="warning",
                                log_config=None, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_healthy(f"{self.url}{API_PREFIX}/health", proc=self.proc, log=self.log,
                     timeout=timeout, verify=self._verify)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(15)
            self._server = None
            self._hub.close()
            self._hub = None

    def kill(self) -> None:
        """kill -9 the serving subprocess."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)
        self.proc = None

    # -- looking inside -----------------------------------------------------------------------

    def status(self) -> HubStatus:
        r = httpx.get(f"{self.url}{API_PREFIX}/admin/status",
                      headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)
        r.raise_for_status()
        return HubStatus.model_validate_json(r.content)

    def revoke(self, client: str) -> None:
        from feddiffuse.hub import Hub

        with Hub.open(self.root) as hub:
            hub.revoke_token(client)

    def received(self) -> list[Received]:
        """Every upload the hub recorded, with the tensor names in its stored file."""
        from feddiffuse.hub.paths import HubPaths
        from feddiffuse.hub.store import open_store

        paths = HubPaths(self.root)
        store = open_store(paths.db)
        try:
            rows = [u for r in store.rounds() for u in store.uploads(r.round)]
        finally:
            store.close()
        out = []
        for row in rows:
            data = (paths.blobs / f"{row.sha256}.safetensors").read_bytes()
            header, _ = read_header(data)
            meta = header.pop("__metadata__", {})
            out.append(Received(row.round, row.client, tuple(row.segments), set(header), meta))
        return out

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "the hub"):
        def reached() -> HubStatus | None:
            status = self.status()
            return status if predicate(status) else None

        return poll_until(reached, what, timeout, interval=0.1,
                          describe=lambda: str(self.status()))
