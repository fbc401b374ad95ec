"""Two `feddiffuse-hub serve` replicas on one PostgreSQL database and one S3 bucket, behind
HAProxy, every part a real process on loopback: a federation through the load balancer ends
with the embedded hub's model, byte for byte; kill -9 of the replica that runs the rounds in
the middle of an aggregation, and the other publishes the same bytes; kill -9 of the replica
receiving an upload, and the client's retry through the load balancer lands on the other.

The participants are the hub tests' fake ones (`Kit`: deterministic deltas, no training), so
the same uploads can be sent to an embedded hub for the reference.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from support.hub_helpers import hub_helpers
from support.net import free_port, wait_healthy
from support.services import HAProxy
from support.wait import poll_until

from feddiffuse.hub import Hub
from feddiffuse.hub.backends import Backends, open_hub_store
from feddiffuse.hub.testhooks import CRASH_ENV, CRASH_EXIT_CODE
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import Manifest
from feddiffuse.shared.wire import sha256_hex

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LEASE_LINE = "runs the round lifecycle now"
FED = {"method": "usplit", "rounds": 2, "seed": 4, "clients": ("alice", "bob", "carol")}


Kit = hub_helpers().Kit


class Replica:
    def __init__(self, root: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "feddiffuse-hub"), "serve", str(root), "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True)

    def wait_ready(self) -> Replica:
        wait_healthy(f"{self.url}{A}/health", proc=self.proc, log=self.log)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def holds_lease(self) -> bool:
        return LEASE_LINE in self.text()

    def spool_files(self) -> list[str]:
        return glob.glob(f"/tmp/feddiffuse-hub-spool-{self.proc.pid}-*/.tmp-*")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def cluster(tmp_path, pg_url, s3_server, s3_bucket) -> Iterator:
    """cluster(env_of_first) -> (setup, [replica, replica], haproxy): a hub on PostgreSQL and
    S3, its first replica started alone (so it takes the lease), then the second, then
    HAProxy in front of both. Everything is stopped at the end, whatever happened."""
    started: list = []

    def make(first_env: Mapping[str, str] | None = None):
        kit = Kit()
        backends = Backends(pg_url, f"s3://{s3_bucket}/hub", s3_server.endpoint)
        setup = kit.make_hub(tmp_path / "hub", backends=backends, **FED)
        first = Replica(setup.root, tmp_path / "replica-0.log", first_env)
        started.append(first)
        first.wait_ready()
        poll_until(first.holds_lease, "the first replica takes the lease", 60,
                   describe=first.text)
        second = Replica(setup.root, tmp_path / "replica-1.log")
        started.append(second)
        second.wait_ready()
        lb = HAProxy([f"127.0.0.1:{r.port}" for r in (first, second)], tmp_path).start()
        started.append(lb)
        wait_healthy(f"{lb.url}{A}/health", log=lb.log)
        return setup, [first, second], lb

    yield make
    for p in reversed(started):
        p.stop()


def open_manifest(kit, http, token: str, round_index: int) -> Manifest:
    """The manifest, once round `round_index` is open (the lease holder may still be
    publishing the previous one when another replica answers)."""
    def ready() -> Manifest | None:
        m = kit.manifest(http, token)
        return m if m.phase == "open" and m.round == round_index else None

    return poll_until(ready, f"round {round_index} open", 120)


def embedded_result(tmp_path: Path) -> tuple[str, dict, str]:
    """The same federation on an embedded hub: the final version, what each client sent in
    each round, and round 1's result."""
    kit = Kit()
    setup = kit.make_hub(tmp_path / "embedded", **FED)
    sent: dict = {}
    with Hub.open(setup.root, serve=True) as hub, kit.test_client(hub) as http:
        for r in range(1, FED["rounds"] + 1):
            for c in FED["clients"]:
                open_manifest(kit, http, setup.tokens[c], r)
                sent[(r, c)] = kit.participate(http, c, setup.tokens[c])
        fed = hub.store.federation()
        assert fed.finished
        return fed.current_version, sent, hub.store.round(1).result_version


def test_two_replicas_behind_haproxy_end_with_the_embedded_hubs_model(tmp_path, cluster):
    expected, _, _ = embedded_result(tmp_path)
    setup, replicas, lb = cluster()
    kit = Kit()
    with httpx.Client(base_url=lb.url, timeout=60) as http:
        for r in range(1, FED["rounds"] + 1):
            for c in FED["clients"]:
                open_manifest(kit, http, setup.tokens[c], r)
                kit.participate(http, c, setup.tokens[c])

        def finished() -> bool:
            return http.get(f"{A}/federation", headers=setup.auth("admin")).json()["finished"]

        poll_until(finished, "the federation finishes", 120)
        store = open_hub_store(setup.root)
        try:
            assert store.federation().current_version == expected
            assert [len(store.uploads(r)) for r in (1, 2)] == [3, 3]
        finally:
            store.close()
        r = http.get(f"{A}/models/{expected}", headers=setup.auth("alice"))
        assert r.status_code == 200 and sha256_hex(r.content) == expected
    for rep in replicas:  # both answered requests; only the first ran the rounds
        assert '"PUT /api/v1/rounds/' in rep.text() or '"GET /api/v1/manifest' in rep.text()
    assert "round 1 closed" in replicas[0].text() and "round 1 closed" not in replicas[1].text()


def test_the_lifecycle_replica_killed_mid_aggregation_and_the_other_publishes_the_same(
        tmp_path, cluster):
    expected, _, _ = embedded_result(tmp_path)
    setup, (first, second), lb = cluster({CRASH_ENV: "aggregate"})
    kit = Kit()
    with httpx.Client(base_url=lb.url, timeout=60) as http:
        for c in FED["clients"]:
            open_manifest(kit, http, setup.tokens[c], 1)
            kit.participate(http, c, setup.tokens[c])
        assert first.proc.wait(120) == CRASH_EXIT_CODE  # it died half way through round 1
        poll_until(second.holds_lease, "the second replica takes the lease", 60,
                   describe=second.text)
        for c in FED["clients"]:  # round 2, through the load balancer: the survivor answers
            open_manifest(kit, http, setup.tokens[c], 2)
            kit.participate(http, c, setup.tokens[c])
        store = open_hub_store(setup.root)
        try:
            poll_until(lambda: store.federation().finished, "the federation finishes", 120)
            assert store.round(1).close_reason == "every participant reported"
            assert store.federation().current_version == expected
        finally:
            store.close()
    assert "round 1 closed" in second.text()


def test_a_replica_killed_mid_upload_and_the_retry_through_the_balancer_lands(tmp_path,
                                                                              cluster):
    _, sent, round_1 = embedded_result(tmp_path)
    setup, replicas, lb = cluster()
    kit = Kit()
    with httpx.Client(base_url=lb.url, timeout=60) as http:
        for c in ("alice", "bob"):
            open_manifest(kit, http, setup.tokens[c], 1)
            kit.participate(http, c, setup.tokens[c])
        open_manifest(kit, http, setup.tokens["carol"], 1)
        body = sent[(1, "carol")].body
    half_sent, release = threading.Event(), threading.Event()

    def slow_body():
        half = len(body) // 2
        for i in range(0, half, 1 << 14):
            yield body[i:min(i + (1 << 14), half)]
        half_sent.set()
        release.wait(60)
        yield body[half:]

    outcome: dict = {}

    def upload() -> None:
        try:
            outcome["response"] = httpx.put(f"{lb.url}{A}/rounds/1/update", content=slow_body(),
                                            headers=setup.auth("carol"), timeout=60)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert half_sent.wait(60)
        receiving = poll_until(lambda: [r for r in replicas if r.spool_files()],
                               "a replica receiving the upload", 60)
        (victim,) = receiving
        victim.kill9()
    finally:
        release.set()
        thread.join(60)
    answer = outcome.get("response")
    assert answer is None or answer.status_code >= 500  # it never got a receipt
    (survivor,) = [r for r in replicas if r is not victim]

    def retried() -> bool:  # the client sends it again, through the balancer
        try:
            r = httpx.put(f"{lb.url}{A}/rounds/1/update", content=body,
                          headers=setup.auth("carol"), timeout=60)
        except httpx.HTTPError:
            return False
        assert r.status_code in (200, 502, 503), r.text
        return r.status_code == 200 and r.json()["sha256"] == sha256_hex(body)

    poll_until(retried, "the retried upload is accepted", 60)
    assert '"PUT /api/v1/rounds/1/update" 200' in survivor.text()
    store = open_hub_store(setup.root)
    try:
        poll_until(lambda: (row := store.round(1)) is not None and row.status == "closed",
                   "round 1 closes", 120, describe=survivor.text)
        assert [u.client for u in store.uploads(1)] == ["alice", "bob", "carol"]
        assert store.round(1).result_version == round_1
    finally:
        store.close()
