"""kill -9 at any moment loses no accepted upload, shows no half file, and an aggregation cut
off is redone from the stored uploads with the same result. Runs `feddiffuse-hub serve` as a
subprocess; the crash points inside the hub are the documented test hook (hub.testhooks)."""

from __future__ import annotations

import threading

import httpx
import pytest
from support.wait import poll_until

from feddiffuse.hub.testhooks import CRASH_ENV, CRASH_EXIT_CODE
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.wire import sha256_hex

pytestmark = pytest.mark.slow


def _wait(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    poll_until(predicate, what, timeout)


def _put(url: str, token: str, body) -> httpx.Response:
    return httpx.put(f"{url}{A}/rounds/1/update", content=body, timeout=60,
                     headers={"Authorization": f"Bearer {token}"})


def test_kill_9_in_the_middle_of_an_upload(tmp_path, kit, hub_process):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    hub = hub_process(setup.root)
    http = httpx.Client(base_url=hub.url, timeout=60)
    fed, _, _ = kit.db_round(setup.root, 1)
    base = kit.blob_state(setup.root, fed.current_version)
    sent = {"alice": kit.participate(http, "alice", setup.tokens["alice"])}
    bob = kit.participate(http, "bob", setup.tokens["bob"], upload=False)
    half_sent, release = threading.Event(), threading.Event()

    def slow_body():
        half = len(bob.body) // 2
        for i in range(0, half, 1 << 16):
            yield bob.body[i:min(i + (1 << 16), half)]
        half_sent.set()
        release.wait(60)
        yield bob.body[half:]

    outcome: dict = {}

    def upload() -> None:
        try:
            outcome["response"] = _put(hub.url, setup.tokens["bob"], slow_body())
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    assert half_sent.wait(60)
    _wait(lambda: any(p.stat().st_size > 0 for p in kit.temp_files(setup.root)),
          what="the partial upload on disk")
    hub.kill9()
    release.set()
    thread.join(60)
    assert "error" in outcome  # the connection died with the hub
    assert kit.temp_files(setup.root)  # the partial file is there, but only as a temporary
    blobs = {p.name for p in (setup.root / "blobs").glob("*.safetensors")}
    assert f"{sha256_hex(bob.body)}.safetensors" not in blobs

    hub = hub_process(setup.root)
    assert kit.temp_files(setup.root) == []  # cleaned at start
    _, row, uploads = kit.db_round(setup.root, 1)
    assert row.status == "open" and [u.client for u in uploads] == ["alice"]
    assert (setup.root / "blobs" / f"{uploads[0].sha256}.safetensors").is_file()
    r = _put(hub.url, setup.tokens["bob"], bob.body)
    assert r.status_code == 200, r.text
    sent["bob"] = bob
    expected = kit.reference(base, "full", 1, 0, ["alice", "bob"], sent)
    _wait(lambda: kit.db_round(setup.root, 1)[1].status == "closed", what="the round to close")
    assert kit.db_round(setup.root, 1)[1].result_version == kit.reference_version(
        expected, "tiny", 1)
    http.close()


@pytest.mark.parametrize("point", ["aggregate", "publish"])
def test_a_cut_off_aggregation_is_redone_with_the_same_result(tmp_path, kit, hub_process,
                                                              point):
    setup = kit.make_hub(tmp_path / "hub", method="usplit", rounds=2, seed=5)
    hub = hub_process(setup.root, env={CRASH_ENV: point})
    fed, _, _ = kit.db_round(setup.root, 1)
    base = kit.blob_state(setup.root, fed.current_version)
    with httpx.Client(base_url=hub.url, timeout=60) as http:
        sent = {c: kit.participate(http, c, t) for c, t in setup.tokens.items()}
    # The last upload was accepted (it got its receipt); closing the round then kills the hub.
    assert hub.proc.wait(60) == CRASH_EXIT_CODE
    fed, row, uploads = kit.db_round(setup.root, 1)
    assert row.status == "closing" and len(uploads) == 3 and fed.current_round == 1
    expected = kit.reference(base, "usplit", 1, 5, sorted(sent), sent)
    version = kit.reference_version(expected, "tiny", 1)

    hub_process(setup.root)  # without the hook: the start redoes the aggregation
    fed, row, _ = kit.db_round(setup.root, 1)
    assert row.status == "closed" and row.result_version == version
    assert fed.current_round == 2 and fed.current_version == version
    assert sha256_hex((setup.root / "blobs" / f"{version}.safetensors").read_bytes()) == version
    assert kit.temp_files(setup.root) == []


def test_kill_9_between_an_upload_blob_and_its_record(tmp_path, kit, hub_process):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    hub = hub_process(setup.root, env={CRASH_ENV: "upload-commit"})
    with httpx.Client(base_url=hub.url, timeout=60) as http:
        alice = kit.participate(http, "alice", setup.tokens["alice"], upload=False)
    with pytest.raises(httpx.HTTPError):
        _put(hub.url, setup.tokens["alice"], alice.body)  # the hub dies before answering
    assert hub.proc.wait(60) == CRASH_EXIT_CODE
    blob = setup.root / "blobs" / f"{sha256_hex(alice.body)}.safetensors"
    assert blob.is_file() and kit.db_round(setup.root, 1)[2] == []  # not recorded: not accepted

    hub = hub_process(setup.root)
    assert not blob.is_file()  # an unrecorded blob is collected at start
    r = _put(hub.url, setup.tokens["alice"], alice.body)
    assert r.status_code == 200 and r.json()["sha256"] == sha256_hex(alice.body)
    assert blob.is_file() and [u.client for u in kit.db_round(setup.root, 1)[2]] == ["alice"]
