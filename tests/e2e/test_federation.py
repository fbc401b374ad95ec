"""Whole federations with real processes on loopback: a hub, clients, and the faults of a
real deployment (kill -9 of the hub, a client killed mid-training, a client that never comes
back, an upload cut off half way), each checked by what the hub ends up holding.

Every run is small (tiny preset, 32 Fashion-MNIST images per client, 1-2 local epochs, batch
16, at most 2 rounds) so the file stays within a few minutes on two busy cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from edge_proxy import CuttingProxy  # the edge client tests' cutting TCP proxy
from federation_fixtures import (
    BIN,
    PAUSE_AFTER_EPOCH_ENV,
    Federation,
    child_env,
    expected_transfers,
    partition,
)
from safetensors.torch import load_file

from feddiffuse.hub.paths import HubPaths
from feddiffuse.hub.store import open_store
from feddiffuse.shared.comm import replay_ledger
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.wire import sha256_hex

pytestmark = [pytest.mark.slow, pytest.mark.requires_fmnist]

PER_CLIENT = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory, fmnist_required_module) -> Path:
    """Three clients' folders of 32 Fashion-MNIST images, as `feddiffuse partition` exports."""
    out = tmp_path_factory.mktemp("fmnist") / "clients"
    return partition(out, clients=3, limit=3 * PER_CLIENT, seed=1)


@pytest.fixture
def federations():
    made: list[Federation] = []

    def make(*args, **kwargs) -> Federation:
        fed = Federation(*args, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.stop()


USPLIT = {"method": "usplit", "rounds": 2, "seed": 3}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, data):
    """A two-client, two-round USplit federation that nothing disturbs."""
    fed = Federation(tmp_path_factory.mktemp("undisturbed"), data, **USPLIT)
    try:
        fed.start_hub()
        for c in fed.clients:
            fed.start_client(c)
        fed.wait_for(lambda s: s.federation.finished, what="the federation to finish")
        fed.wait_clients()  # they fetch the final model, then leave
        fed.final = fed.export(fed.work / "final.safetensors")
        fed.final_status = fed.status()
        fed.final_uploads = fed.uploads()
        yield fed
    finally:
        fed.stop()


def blob_bytes_equal(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes()
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].equal(tb[name]), name


def test_bytes_over_http_equal_the_ledger(undisturbed):
    fed, status = undisturbed, undisturbed.final_status
    assert [h.round for h in status.history] == [1, 2]
    assert all(h.missing == [] and len(h.reported) == 2 for h in status.history)
    expected = expected_transfers("tiny", fed.method, fed.clients, fed.rounds, fed.seed,
                                  fed.final_uploads, HubPaths(fed.root).blobs)
    measured = {h.round: {"bytes_in": h.bytes_in, "bytes_out": h.bytes_out}
                for h in status.history}
    assert measured == expected
    # The stored uploads are the bytes that crossed: one per client and round, each as big
    # as its record says.
    for u in fed.final_uploads:
        assert fed.blob(u.sha256).stat().st_size == u.bytes
    # The core's replay (no training) writes the same metadata (the hub's full-model file,
    # the clients' fixed-width mean loss): with every client's sample count it agrees to the
    # byte.
    ledger = replay_ledger("tiny", fed.method, len(fed.clients), fed.rounds, seed=fed.seed,
                           samples_per_client=PER_CLIENT).totals()
    up = sum(m["bytes_in"] for m in measured.values())
    down = sum(m["bytes_out"] for m in measured.values())
    assert (ledger["uplink_bytes"], ledger["downlink_bytes"]) == (up, down)


def test_compressed_federation_bytes_equal_comm_to_the_byte(tmp_path, data, federations):
    """top-k + int8 uploads with error feedback, int8 downloads (the initial model, then each
    round's update, the client's copy moved by the same addition as the hub's): the
    federation finishes, every client ends holding the hub's final bytes, and what crossed
    HTTP is what `feddiffuse comm` counts."""
    up_codec, down_codec = "topk:0.05+int8", "int8"
    fed = federations(tmp_path / "fed", data, method="ulatdec", rounds=2, seed=3,
                      uplink_codec=up_codec, downlink_codec=down_codec)
    fed.start_hub()
    for c in fed.clients:
        fed.start_client(c)
    fed.wait_for(lambda s: s.federation.finished, what="the federation to finish")
    fed.wait_clients()  # they fetch the final model, then leave: read the bytes after that
    status = fed.status()
    assert status.federation.uplink_codec == up_codec
    assert all(h.missing == [] and len(h.reported) == 2 for h in status.history)
    res = subprocess.run([str(BIN / "feddiffuse"), "comm", "--preset", "tiny", "--method",
                          "ulatdec", "--clients", "2", "--rounds", "2", "--seed", "3",
                          "--samples-per-client", str(PER_CLIENT), "--uplink-codec", up_codec,
                          "--downlink-codec", down_codec, "--json"],
                         capture_output=True, text=True, env=child_env(), check=True)
    comm = json.loads(res.stdout)
    up = sum(h.bytes_in for h in status.history)
    down = sum(h.bytes_out for h in status.history)
    assert (comm["uplink_bytes"], comm["downlink_bytes"]) == (up, down)
    assert comm["bytes_vs_full_fp32"] < 0.3
    # Each client's shared segments are the hub's final ones, bit for bit.
    final = fed.export(fed.work / "final.safetensors")
    hub_final = load_file(final)
    seg_of = segment_map(build_unet("tiny"))
    for c in fed.clients:
        (path,) = fed.home(c).rglob("global.safetensors")
        held = load_file(path)
        for n, t in hub_final.items():
            if seg_of[n] in ("bottleneck", "decoder"):
                assert torch.equal(held[n], t), (c, n)


def test_hub_killed_mid_round_finishes_with_the_same_model(tmp_path, data, undisturbed,
                                                           federations):
    fed = federations(tmp_path / "fed", data, **USPLIT)
    assert fed.clients == undisturbed.clients
    fed.start_hub()
    # client-01 comes late, so round 1 is surely open with client-00's report in and
    # client-01's missing when the hub is killed (both are its participants: their tokens
    # existed when it opened).
    fed.start_client("client-00")
    fed.wait_for(lambda s: s.current is not None and s.current.round == 1
                 and s.current.reported == ["client-00"], what="client-00's report in round 1")
    accepted = {(u.round, u.client): u.sha256 for u in fed.uploads()}
    assert list(accepted) == [(1, "client-00")]
    fed.start_client("client-01")  # it finds the hub gone and keeps trying (--wait)
    before = {c: fed.log_size(c) for c in fed.clients}
    fed.kill_hub()
    for c in fed.clients:  # each finds the hub gone and backs off before it comes back
        fed.wait_for_log(c, r"^\S+ retry: ", start=before[c])
    fed.start_hub()
    status = fed.wait_for(lambda s: s.federation.finished, what="the federation to finish")
    fed.wait_clients()
    after = {(u.round, u.client): u.sha256 for u in fed.uploads()}
    assert {k: after[k] for k in accepted} == accepted  # no accepted upload lost or changed
    assert sorted(after) == [(r, c) for r in (1, 2) for c in fed.clients]
    assert [len(h.reported) for h in status.history] == [2, 2]
    # Training is deterministic given the hub's seeds and the same data: same uploads, and
    # the same final global model bit for bit.
    assert after == {(u.round, u.client): u.sha256 for u in undisturbed.final_uploads}
    final = fed.export(tmp_path / "final.safetensors")
    blob_bytes_equal(final, undisturbed.final)
    # Round 2 started from the same global version as well.
    assert [h.global_version for h in status.history] == [
        h.global_version for h in undisturbed.final_status.history]


def test_client_killed_during_training_resumes_and_the_round_completes(tmp_path, data,
                                                                      federations):
    fed = federations(tmp_path / "fed", data, method="full", rounds=1, local_epochs=2)
    fed.start_hub()
    # The victim stops itself after epoch 1 (the pause hook) and is killed while stopped:
    # surely mid-round, never after its upload.
    victim = fed.start_client("client-00", "--once", env={PAUSE_AFTER_EPOCH_ENV: "1"})
    fed.start_client("client-01", "--once")
    fed.wait_paused("client-00")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(15)
    victim.expected_exit = True
    assert victim.returncode == -signal.SIGKILL
    assert "client-00" not in [u.client for u in fed.uploads()]
    again = fed.start_client("client-00", "--once")
    status = fed.wait_for(lambda s: s.federation.finished, what="the round to complete")
    again.wait(60)
    log = fed.client_log("client-00").read_text()
    assert again.returncode == 0, log
    assert re.search(r"resuming from the checkpoint of epoch 1/2", log), log
    assert [h.reported for h in status.history] == [["client-00", "client-01"]]
    assert sorted(u.client for u in fed.uploads()) == ["client-00", "client-01"]


def test_a_client_that_never_comes_back_is_left_out_at_the_deadline(tmp_path, data,
                                                                     federations):
    clients = ("client-00", "client-01", "client-02")
    fed = federations(tmp_path / "fed", data, method="full", clients=clients, rounds=1,
                      min_clients=2, round_timeout=20)
    fed.start_hub()
    # client-02 stops itself after its epoch (the pause hook), before it could upload, and is
    # killed there, before the others start: however slow any of them is, the round holds
    # two reports at most and must wait for its deadline to close without client-02.
    lost = fed.start_client("client-02", env={PAUSE_AFTER_EPOCH_ENV: "1"})
    fed.wait_paused("client-02")
    os.killpg(lost.pid, signal.SIGKILL)  # gone for good
    lost.wait(15)
    lost.expected_exit = True
    for c in clients[:2]:
        fed.start_client(c)
    status = fed.wait_for(lambda s: s.federation.finished, what="the round to close")
    fed.procs.pop("client-02")
    fed.wait_clients()
    (summary,) = status.history
    assert summary.participants == list(clients)
    assert summary.reported == ["client-00", "client-01"] and summary.missing == ["client-02"]
    closed_after = (summary.closed_at - summary.opened_at).total_seconds()
    assert closed_after >= 19.5  # it waited for the deadline, then closed with the quorum
    shown = subprocess.run([str(BIN / "feddiffuse-hub"), "status", str(fed.root)],
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^\s+missing: client-02$", shown.stdout, re.MULTILINE), shown.stdout
    as_json = subprocess.run([str(BIN / "feddiffuse-hub"), "status", str(fed.root), "--json"],
                             capture_output=True, text=True, env=child_env(), timeout=60)
    assert '"missing":["client-02"]' in as_json.stdout.replace(" ", "").replace("\n", "")


def test_an_upload_cut_half_way_is_retried_and_stored_once(tmp_path, data, federations):
    fed = federations(tmp_path / "fed", data, method="full", clients=("client-00",), rounds=1)
    fed.start_hub()
    model_bytes = 4 * sum(p.numel() for p in build_unet("tiny").parameters())
    proxy = CuttingProxy(fed.port, limit=model_bytes // 2)
    try:
        proxy.cut_upload = 1
        fed.start_client("client-00", "--once", url=proxy.url)
        status = fed.wait_for(lambda s: s.federation.finished, what="the round to complete")
        fed.wait_clients()
    finally:
        proxy.close()
    assert proxy.cuts == ["upload"]
    assert re.search(r"retry: .*upload", fed.client_log("client-00").read_text())
    (upload,) = fed.uploads()
    assert upload.client == "client-00" and status.history[0].reported == ["client-00"]
    blob = fed.blob(upload.sha256)
    assert blob.stat().st_size == upload.bytes > model_bytes
    assert sha256_hex(blob.read_bytes()) == upload.sha256
    paths = HubPaths(fed.root)
    assert not list(paths.blobs.glob(".tmp-*"))  # the cut-off body left nothing behind
    # Every blob is one the hub's records name (global versions, segment files, uploads):
    # the upload is there once, and the cut-off attempt left no second copy.
    store = open_store(paths.db)
    try:
        referenced = store.referenced_blobs()
    finally:
        store.close()
    on_disk = {p.name.removesuffix(".safetensors") for p in paths.blobs.glob("*.safetensors")}
    assert upload.sha256 in on_disk and on_disk <= referenced
