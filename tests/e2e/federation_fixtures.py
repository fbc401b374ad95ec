"""Real federations on loopback for the end-to-end tests: every part is its own process.

`Federation` drives the installed commands the way an operator and data owners would:
`feddiffuse-hub init`, `token create`, `serve` and `export`, and one `feddiffuse-client join`
per data owner over the folders written by `feddiffuse partition --export`. The hub is served
in a subprocess of its own session, so a test can kill -9 it and start it again on the same
port. What the hub holds is read back from its admin API, its store and its blob folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import torch
from support.net import free_port, wait_healthy
from support.procs import wait_until_stopped
from support.wait import poll_until

from feddiffuse.hub.paths import HubPaths
from feddiffuse.hub.store import open_store
from feddiffuse.hub.store.base import UploadRow
from feddiffuse.hub.weights import ALL_KEY, global_metadata
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.protocol import API_PREFIX, HubStatus
from feddiffuse.shared.rounds import RoundState
from feddiffuse.shared.wire import encode_tensors, read_header

BIN = Path(sys.executable).parent
FAST = ["--backoff-initial", "0.1", "--backoff-max", "0.5", "--poll", "0.2"]
# The client's test hook: SIGSTOP itself once, right after the checkpoint of this epoch.
PAUSE_AFTER_EPOCH_ENV = "FEDDIFFUSE_TEST_PAUSE_AFTER_EPOCH"
TOKEN_LINE = re.compile(r"^fdh_\S+$", re.MULTILINE)


def child_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    if home is not None:
        env["FEDDIFFUSE_HOME"] = str(home)
    return env


def run_cli(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done.stdout


def partition(out: Path, clients: int, limit: int, seed: int = 1, split: str = "iid") -> Path:
    run_cli("feddiffuse", "partition", "--dataset", "fashion-mnist", "--clients", str(clients),
            "--split", split, "--limit", str(limit), "--seed", str(seed), "--preset", "tiny",
            "--export", str(out))
    return out


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """End `proc` and its process group (each child runs in a session of its own)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)
    except ProcessLookupError:
        pass


class Federation:
    """A hub directory plus the processes that serve it and take part in it."""

    def __init__(self, work: Path, data: Path, *, method: str = "full",
                 clients: Sequence[str] = ("client-00", "client-01"), rounds: int = 2,
                 local_epochs: int = 1, min_clients: int | None = None,
                 round_timeout: float | None = None, seed: int = 0, batch_size: int = 16,
                 lr: float = 1e-3, uplink_codec: str = "fp32",
                 downlink_codec: str = "fp32", init_args: Sequence[str] = ()) -> None:
        self.work, self.data, self.method = work, data, method
        self.clients = tuple(clients)
        self.rounds, self.seed = rounds, seed
        self.root = work / "hub"
        work.mkdir(parents=True, exist_ok=True)
        args = ["feddiffuse-hub", "init", str(self.root), "--preset", "tiny", "--method", method,
                "--rounds", str(rounds), "--local-epochs", str(local_epochs),
                "--min-clients", str(min_clients or len(self.clients)), "--seed", str(seed),
                "--batch-size", str(batch_size), "--lr", str(lr),
                "--uplink-codec", uplink_codec, "--downlink-codec", downlink_codec]
        if round_timeout is not None:
            args += ["--round-timeout", str(round_timeout)]
        args += list(init_args)
        self.admin = TOKEN_LINE.findall(run_cli(*args))[-1]
        self.tokens = {c: TOKEN_LINE.findall(run_cli("feddiffuse-hub", "token", "create",
                                                      str(self.root), c))[-1]
                       for c in self.clients}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.hub_log = work / "hub-serve.log"

    # -- the hub ---------------------------------------------------------------------------

    def start_hub(self, env: Mapping[str, str] | None = None, wait: bool = True) -> None:
        with open(self.hub_log, "ab") as log:
            self.hub = subprocess.Popen(
                [str(BIN / "feddiffuse-hub"), "serve", str(self.root), "--port", str(self.port),
                 "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT,
                env=child_env(**(env or {})), start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_healthy(f"{self.url}{API_PREFIX}/health", proc=self.hub, log=self.hub_log,
                     timeout=timeout)

    def kill_hub(self) -> None:
        """kill -9 the serving process."""
        assert self.hub is not None and self.hub.poll() is None
        os.killpg(self.hub.pid, signal.SIGKILL)
        self.hub.wait(15)
        self.hub = None

    def status(self) -> HubStatus:
        r = httpx.get(f"{self.url}{API_PREFIX}/admin/status", timeout=10,
                      headers={"Authorization": f"Bearer {self.admin}"})
        r.raise_for_status()
        return HubStatus.model_validate_json(r.content)

    def wait_for(self, predicate, timeout: float = 180.0, what: str = "the hub") -> HubStatus:
        def reached() -> HubStatus | None:
            self.check_clients()
            try:
                status = self.status()
            except httpx.HTTPError:
                return None
            return status if predicate(status) else None

        return poll_until(reached, what, timeout, interval=0.2, describe=self.logs)

    # -- the clients -----------------------------------------------------------------------

    def home(self, client: str) -> Path:
        return self.work / "homes" / client

    def client_log(self, client: str) -> Path:
        return self.work / f"{client}.log"

    def start_client(self, client: str, *extra: str, url: str | None = None,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen:
        cmd = [str(BIN / "feddiffuse-client"), "join", "--hub", url or self.url, "--token",
               self.tokens[client], "--data", str(self.data / client), "--device", "cpu",
               "--wait", *FAST, *extra]
        with open(self.client_log(client), "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env=child_env(self.home(client), **(env or {})),
                                    start_new_session=True)
        self.procs[client] = proc
        return proc

    def check_clients(self) -> None:
        """Fail at once when a client ended with an error."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code not in (None, 0) and getattr(proc, "expected_exit", None) is None:
                raise AssertionError(f"{name} exited with {code}:\n"
                                     f"{self.client_log(name).read_text()[-3000:]}")

    def log_size(self, client: str) -> int:
        log = self.client_log(client)
        return log.stat().st_size if log.exists() else 0

    def wait_for_log(self, client: str, pattern: str, start: int = 0,
                     timeout: float = 300.0) -> None:
        """Wait until `client`'s log, from byte `start`, has a line matching `pattern`."""
        def found() -> bool:
            self.check_clients()
            log = self.client_log(client)
            text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
            return re.search(pattern, text, re.MULTILINE) is not None

        poll_until(found, f"{pattern!r} in {client}'s log", timeout, interval=0.1,
                   describe=self.logs)

    def wait_paused(self, client: str, timeout: float = 300.0) -> None:
        """Wait until a client started with the pause hook (PAUSE_AFTER_EPOCH_ENV) has
        stopped itself (SIGSTOP) after its epoch. Fails if it exits instead."""
        wait_until_stopped(self.procs[client], timeout,
                           lambda: self.client_log(client).read_text()[-3000:])

    def wait_clients(self, timeout: float = 120.0) -> None:
        for name, proc in self.procs.items():
            proc.wait(timeout)
            assert proc.returncode == 0, self.client_log(name).read_text()[-3000:]

    def logs(self) -> str:
        parts = [f"--- hub\n{self.hub_log.read_text()[-2000:] if self.hub_log.exists() else ''}"]
        for name in self.procs:
            log = self.client_log(name)
            parts.append(f"--- {name}\n{log.read_text()[-2000:] if log.exists() else ''}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        stop_process(self.hub)
        self.hub = None

    # -- looking inside --------------------------------------------------------------------

    def uploads(self) -> list[UploadRow]:
        store = open_store(HubPaths(self.root).db)
        try:
            return [u for r in store.rounds() for u in store.uploads(r.round)]
        finally:
            store.close()

    def blob(self, sha: str) -> Path:
        return HubPaths(self.root).blobs / f"{sha}.safetensors"

    def export(self, out: Path) -> Path:
        run_cli("feddiffuse-hub", "export", str(self.root), str(out))
        return out


# -- bytes that crossed HTTP, from the encoding -----------------------------------------------

def upload_metadata(blob: Path) -> dict[str, str]:
    header, _ = read_header(blob.read_bytes())
    return dict(header.get("__metadata__", {}))


def expected_transfers(preset: str, method: str, clients: Sequence[str], rounds: int,
                       seed: int, uploads: Sequence[UploadRow], blobs: Path,
                       ) -> dict[int, dict[str, int]]:
    """Per round, the bytes the hub must have received and sent, sized with the wire codec.

    The plans come from the same `RoundState` as the hub's and `comm.replay_ledger`; every file
    is encoded with zeros of the right shapes and the metadata the hub and the client write:
    the full global file carries `global_metadata` (with `completed_rounds`, without a
    `version`), a segment file the version it was cut from, and an upload the metadata the
    client wrote (its own sample count and `mean_loss`), read back from the stored blob.
    """
    model = build_unet(preset, seed=0)
    seg_of = segment_map(model)
    zeros_of = {n: torch.zeros(tuple(p.shape)) for n, p in model.named_parameters()}
    stored = {(u.round, u.client): u for u in uploads}
    version = "0" * 64  # the same length as any sha256 hex digest
    out: dict[int, dict[str, int]] = {}
    for r in range(1, rounds + 1):
        state = RoundState.open(method, r, list(clients), zeros_of, seg_of, seed=seed)
        down = up = 0
        for cid in clients:
            plan = state.plans[cid]
            names = state.names_for(plan.download)
            key = ",".join(plan.download)
            meta = (global_metadata(preset, r) if key == ALL_KEY else
                    {"kind": "global", "preset": preset, "round": r, "version": version,
                     "segments": key})
            down += len(encode_tensors({n: zeros_of[n] for n in names}, meta))
            row = stored[(r, cid)]
            meta = upload_metadata(blobs / f"{row.sha256}.safetensors")
            up += len(encode_tensors({n: zeros_of[n] for n in state.expected_upload_shapes(cid)},
                                     meta))
        out[r] = {"bytes_in": up, "bytes_out": down}
    return out
