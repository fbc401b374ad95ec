"""The client against a real feddiffuse-hub on loopback: methods, resume after a kill, faults.

What the hub received is read from its own store, so "only the assigned segments" and
"personal segments never leave the client" are checked where it matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch
from edge_images import make_images
from edge_proxy import CuttingProxy
from edge_realhub import RealHub, quiet_env, script
from edge_sync import LineReader, wait_until_stopped

from feddiffuse.edge_client import events as ev
from feddiffuse.edge_client.backoff import Backoff
from feddiffuse.edge_client.hub_client import HubClient
from feddiffuse.edge_client.participant import (
    CRASH_AFTER_EPOCH_ENV,
    PAUSE_AFTER_EPOCH_ENV,
    Participant,
    ParticipantOptions,
)
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.model import build_unet, segment_map

pytestmark = pytest.mark.slow

SEGMENT_OF = segment_map(build_unet("tiny"))
FAST = ["--backoff-initial", "0.1", "--backoff-max", "0.5", "--poll", "0.2"]


def names_of(segments) -> set[str]:
    return {n for n, s in SEGMENT_OF.items() if s in segments}


class InProcessClient:
    def __init__(self, hub: RealHub, name: str, tmp_path, url: str | None = None) -> None:
        self.name = name
        self.url = url or hub.url
        self.token = hub.tokens[name]
        self.store = HubFolder(self.url, home=tmp_path / name / "home")
        self.images = make_images(tmp_path / name / "images", n=16, seed=len(name))
        self.events: list = []
        self.error: BaseException | None = None

    def run(self, once: bool = False):
        options = ParticipantOptions(self.images, "cpu", once=once, await_final=False,
                                     backoff=Backoff(initial=0.05, maximum=0.5), poll_s=0.2)
        with HubClient(self.url, self.token) as hub:
            return Participant(hub, self.store, options, self.events.append).run()

    def run_in_thread(self, **kwargs) -> threading.Thread:
        def target():
            try:
                self.outcome = self.run(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def manifests(self):
        return [e.manifest for e in self.events if isinstance(e, ev.RoundEvent)]


def run_to_the_end(clients: list[InProcessClient]) -> None:
    """Run every client in its own thread until the federation is over; fail on an error."""
    threads = [c.run_in_thread() for c in clients]
    for t in threads:
        t.join(timeout=600)  # a hang fails here; a correct run is far quicker
        assert not t.is_alive(), "a client thread did not finish"
    for c in clients:
        assert c.error is None, repr(c.error)


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_two_clients_two_rounds_against_the_hub(method, tmp_path):
    hub = RealHub(tmp_path / "hub", method=method).start_in_thread()
    try:
        clients = [InProcessClient(hub, name, tmp_path) for name in ("alice", "bob")]
        run_to_the_end(clients)
        for c in clients:
            assert c.outcome.finished and c.outcome.rounds_done == [1, 2]
        received = hub.received()
        assert sorted((r.round, r.client) for r in received) == [
            (1, "alice"), (1, "bob"), (2, "alice"), (2, "bob")]
        personal = set(personal_segments(method))
        assigned = {(m.round, m.client_id): tuple(m.upload_segments)
                    for c in clients for m in c.manifests() if m.phase == "open"}
        for r in received:
            assert r.names == names_of(assigned[(r.round, r.client)]), (r.round, r.client)
            assert not r.names & names_of(personal)
            assert r.metadata["feddiffuse.kind"] == "delta"
        if method == "usplit":  # each round, the pair reports the whole model between them
            for rnd in (1, 2):
                union = set().union(*(r.names for r in received if r.round == rnd))
                assert union == set(SEGMENT_OF)
        for c in clients:
            held = c.store.load_global()
            final = [m for m in c.manifests() if m.phase == "finished"][-1]
            assert held.version == final.global_version
            if personal:
                kept = c.store.load_personal()
                assert set(kept) == names_of(personal)
                # Trained locally, never sent: the personal weights differ from the hub's.
                name = sorted(kept)[0]
                assert not torch.equal(kept[name], held.tensors[name])
    finally:
        hub.stop()


def hub_manifest(hub: RealHub, name: str) -> dict:
    r = httpx.get(f"{hub.url}/api/v1/manifest",
                  headers={"Authorization": f"Bearer {hub.tokens[name]}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def join_two_once(hub: RealHub, tmp_path) -> tuple[dict[str, Path], dict[str, str]]:
    """alice and bob run `join --once` at the same time; their homes and their output."""
    homes = {n: tmp_path / n / "home" for n in ("alice", "bob")}
    procs = {n: subprocess.Popen(
        join_cmd(hub, n, make_images(tmp_path / n / "images", seed=len(n)), "--once"),
        env=quiet_env(homes[n]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for n in homes}
    outputs = {n: p.communicate(timeout=240)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, outputs[n]
    return homes, outputs


def test_sample_says_when_the_hub_has_a_newer_model(tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", rounds=2).start()
    try:
        homes, outputs = join_two_once(hub, tmp_path)
        for out in outputs.values():
            assert "holds its final model" not in out  # round 1 of 2: --once returns
        hub.wait_for(lambda s: s.federation.current_round == 2, what="round 2 to open")
        newer = hub_manifest(hub, "alice")["global_version"]
        grid = tmp_path / "grid.png"
        sample = subprocess.run([script("feddiffuse-client"), "sample", "--n", "2", "--steps",
                                 "2", "--out", str(grid), "--device", "cpu"],
                                env=quiet_env(homes["alice"]), capture_output=True, text=True,
                                timeout=120)
        assert sample.returncode == 0, sample.stderr
        assert "after 0 round(s)" in sample.stdout  # it holds round 1's starting model
        assert (f"Note: the hub has a newer model than the one sampled here (the global "
                f"model of round 2, {newer[:12]}); `feddiffuse-client join` fetches it."
                in sample.stdout), sample.stdout
        status = subprocess.run([script("feddiffuse-client"), "status", "--json"],
                                env=quiet_env(homes["alice"]), capture_output=True, text=True,
                                timeout=120)
        assert json.loads(status.stdout)["newer_on_hub"] == newer
    finally:
        hub.stop()


def join_cmd(hub: RealHub, name: str, data, *extra: str) -> list[str]:
    return [script("feddiffuse-client"), "join", "--hub", hub.url, "--token", hub.tokens[name],
            "--data", str(data), "--device", "cpu", *FAST, *extra]


def test_cli_join_status_and_sample_with_two_clients(tmp_path):
    hub = RealHub(tmp_path / "hub", method="usplit", rounds=1).start()
    try:
        homes, outputs = join_two_once(hub, tmp_path)
        for n in homes:
            assert "Training on cpu: CPU, as asked." in outputs[n]
            assert "Round 1: uploaded" in outputs[n]
            # `--once` on the last round stays until the final model is published.
            assert "holds its final model" in outputs[n], outputs[n]
        hub.wait_for(lambda s: s.federation.finished, what="the federation to finish")
        final = hub_manifest(hub, "alice")
        assert final["phase"] == "finished" and final["round"] == 1
        status = subprocess.run([script("feddiffuse-client"), "status"], env=quiet_env(
            homes["alice"]), capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert hub.url in status.stdout and "edge-test" in status.stdout
        assert "last report  round 1" in status.stdout
        assert "newer on hub" not in status.stdout
        for n in homes:
            as_json = subprocess.run([script("feddiffuse-client"), "status", "--json"],
                                     env=quiet_env(homes[n]), capture_output=True, text=True,
                                     timeout=120)
            report = json.loads(as_json.stdout)
            assert report["global_model"]["version"] == final["global_version"], report
            assert report["global_model"]["rounds_completed"] == 1
            assert report["finished"] is True and report["newer_on_hub"] is None
            assert report["hub_round"]["phase"] == "finished"
            assert "holds its final model" in Path(report["log"]).read_text()
        token_file = next((homes["alice"] / "client" / "hubs").iterdir()) / "token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        grid = tmp_path / "grid.png"
        sample = subprocess.run([script("feddiffuse-client"), "sample", "--n", "4", "--steps",
                                 "2", "--out", str(grid), "--device", "cpu"],
                                env=quiet_env(homes["alice"]), capture_output=True, text=True,
                                timeout=120, umask=0o022)
        assert sample.returncode == 0, sample.stderr
        assert grid.is_file() and str(grid) in sample.stdout
        assert f"global model {final['global_version'][:12]} after 1 round(s)" in sample.stdout
        assert "newer model" not in sample.stdout
        assert oct(grid.stat().st_mode & 0o777) == "0o644"  # a picture to share
    finally:
        hub.stop()


@pytest.mark.parametrize("how", ["crash-hook", "sigkill"])
def test_killed_during_training_resumes_from_the_last_epoch(how, tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=1,
                  local_epochs=3).start_in_thread()
    try:
        home = tmp_path / "home"
        images = make_images(tmp_path / "images", n=48)
        # crash-hook: the client exits by itself after epoch 1. sigkill: it stops itself
        # after epoch 1 (the pause hook) and is killed while stopped, so the kill surely lands
        # mid-round, never after the round was uploaded.
        hook = CRASH_AFTER_EPOCH_ENV if how == "crash-hook" else PAUSE_AFTER_EPOCH_ENV
        proc = subprocess.Popen(join_cmd(hub, "alice", images, "--once"),
                                env=quiet_env(home, **{hook: "1"}), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if how == "sigkill":
            wait_until_stopped(proc)
            os.killpg(proc.pid, signal.SIGKILL)
        first, _ = proc.communicate(timeout=180)
        assert proc.returncode != 0, first
        if how == "sigkill":
            assert proc.returncode == -signal.SIGKILL, first
        assert "uploaded" not in first
        assert "epoch 1/3" in first  # both hooks act after the epoch's log line
        assert [p.name for p in home.rglob("epoch-00*.safetensors")] == [
            "epoch-001.safetensors"], first
        assert not hub.received()
        again = subprocess.run(join_cmd(hub, "alice", images, "--once"), env=quiet_env(home),
                               capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming from the checkpoint of epoch 1/3" in again.stdout, again.stdout
        done = re.findall(r"epoch (\d)/3 loss", again.stdout)
        assert done == ["2", "3"]
        # The round's global model was already on disk; only the final one is fetched.
        assert "[downloading] round 1" not in again.stdout
        assert "holds its final model" in again.stdout, again.stdout
        assert [r.client for r in hub.received()] == ["alice"]
    finally:
        hub.stop()


def test_hub_down_at_start_then_restarted_mid_round(tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=2,
                  local_epochs=3)
    home = tmp_path / "home"
    images = make_images(tmp_path / "images", n=48)
    # The hub is not serving yet: a first join with --wait keeps trying until it is up. The
    # client stops itself after epoch 1 of round 1 (the pause hook), so the hub is surely
    # killed mid-round, and it is down when the client comes to upload.
    proc = subprocess.Popen(join_cmd(hub, "alice", images, "--wait"),
                            env=quiet_env(home, **{PAUSE_AFTER_EPOCH_ENV: "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = LineReader(proc)
    try:
        reader.wait_for(lambda line: "retry: reaching the hub" in line,
                        what="a retry to reach the hub")
        assert not home.exists() or not list(home.rglob("token"))  # nothing saved yet
        hub.start()
        wait_until_stopped(proc, describe=reader.text)
        assert list(home.rglob("epoch-001.safetensors"))
        hub.kill()  # mid-round, while the client is stopped after epoch 1
        seen = len(reader.lines)
        os.kill(proc.pid, signal.SIGCONT)
        reader.wait_for(lambda line: "retry:" in line and "uploading" in line, start=seen,
                        what="a retry of the upload")
        assert proc.poll() is None, reader.text()
        hub.start()
        proc.wait(timeout=300)
        reader.join()
        out = reader.text()
        assert proc.returncode == 0, out
        assert "The federation is finished" in out
        assert [(r.round, r.client) for r in hub.received()] == [(1, "alice"), (2, "alice")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
        hub.stop()


def test_known_hub_down_at_start_is_waited_for(tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=2).start()
    home = tmp_path / "home"
    images = make_images(tmp_path / "images", n=16)
    proc = None
    try:
        first = subprocess.run(join_cmd(hub, "alice", images, "--once"), env=quiet_env(home),
                               capture_output=True, text=True, timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        hub.stop()
        proc = subprocess.Popen([script("feddiffuse-client"), "join", *FAST],
                                env=quiet_env(home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        reader = LineReader(proc)
        # It has found the hub down and keeps trying (it would have exited otherwise).
        reader.wait_for(lambda line: "retry: fetching the round manifest failed" in line
                        and "connection refused" in line, what="a retry of the manifest")
        assert proc.poll() is None, reader.text()
        hub.start()
        proc.wait(timeout=240)
        reader.join()
        out = reader.text()
        assert proc.returncode == 0, out
        assert "The federation is finished" in out
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(15)
        hub.stop()


def test_cut_off_download_and_upload_recover(tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=1)
    hub.start_in_thread()
    proxy = CuttingProxy(hub.port, limit=300_000)
    try:
        proxy.cut_download = 1
        proxy.cut_upload = 1
        client = InProcessClient(hub, "alice", tmp_path, url=proxy.url)
        outcome = client.run(once=True)
        assert outcome.rounds_done == [1]
        assert sorted(proxy.cuts) == ["download", "upload"]
        retries = [e for e in client.events if isinstance(e, ev.RetryEvent)]
        assert any("downloading" in e.what for e in retries)
        assert any("uploading" in e.what for e in retries)
        assert [r.client for r in hub.received()] == ["alice"]
    finally:
        proxy.close()
        hub.stop()


def test_revoked_token_is_reported_in_one_sentence(tmp_path):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=1)
    hub.start_in_thread()
    try:
        home = tmp_path / "home"
        images = make_images(tmp_path / "images", n=16)
        hub.revoke("alice")
        res = subprocess.run(join_cmd(hub, "alice", images, "--once"), env=quiet_env(home),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        assert res.stderr.strip().startswith("error: The hub at")
        assert "wrong or has been revoked" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not home.exists()
    finally:
        hub.stop()


def make_private_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 that it signed, made with openssl."""
    folder.mkdir(parents=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "hub.key",
                                                         "hub.csr", "hub.pem"))
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
            str(ca), "-days", "2", "-subj", "/CN=FedDiffuse test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key, ca


def test_ca_cert_lets_the_client_trust_a_hub_with_a_private_certificate(tmp_path):
    cert, key, ca = make_private_ca(tmp_path / "tls")
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=1)
    hub.start(tls=(cert, key, ca))
    try:
        home = tmp_path / "home"
        images = make_images(tmp_path / "images", n=16)
        # Without --ca-cert: one sentence that names the certificate, nothing written.
        res = subprocess.run(join_cmd(hub, "alice", images, "--once"), env=quiet_env(home),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert "presented a certificate this machine does not trust" in lines[0]
        assert "--ca-cert" in lines[0]
        assert not (home / "client" / "hubs").exists()
        # A file that is not a certificate: one sentence too.
        bogus = tmp_path / "not-a-cert.pem"
        bogus.write_text("hello")
        res = subprocess.run(join_cmd(hub, "alice", images, "--once", "--ca-cert", str(bogus)),
                             env=quiet_env(home), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "is not a PEM certificate file" in res.stderr, res.stderr
        # With the CA: the federation runs over HTTPS, and the CA is remembered for the hub.
        res = subprocess.run(join_cmd(hub, "alice", images, "--once", "--ca-cert", str(ca)),
                             env=quiet_env(home), capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "holds its final model" in res.stdout
        status = subprocess.run([script("feddiffuse-client"), "status", "--json"],
                                env=quiet_env(home), capture_output=True, text=True,
                                timeout=120)
        report = json.loads(status.stdout)
        assert report["ca_cert"] == str(ca.resolve()) and report["hub_error"] is None
        assert report["hub_round"]["phase"] == "finished"
    finally:
        hub.stop()
