"""Rounds through the ASGI app in-process: every method, USplit pairs, quorum, deadline, admin."""

from __future__ import annotations

import pytest
import torch

from feddiffuse.hub import Hub
from feddiffuse.shared.methods import download_segments, usplit_assignment
from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import API_PREFIX as A
from feddiffuse.shared.protocol import HubStatus, Manifest


def status(http, setup) -> HubStatus:
    r = http.get(f"{A}/admin/status", headers=setup.auth("admin"))
    assert r.status_code == 200, r.text
    return HubStatus.model_validate_json(r.content)


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_two_rounds_of_each_method_match_in_memory_fedavg(tmp_path, kit, method):
    setup = kit.make_hub(tmp_path / "hub", method=method, rounds=2, seed=3)
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        for r in (1, 2):
            fed, _, _ = kit.db_round(setup.root, r)
            base = kit.blob_state(setup.root, fed.current_version)
            sent = {c: kit.participate(http, c, t) for c, t in setup.tokens.items()}
            for s in sent.values():
                assert s.manifest.round == r
                assert s.manifest.download_segments == list(download_segments(method, r))
            expected = kit.reference(base, method, r, 3, sorted(setup.tokens), sent)
            fed, row, uploads = kit.db_round(setup.root, r)
            assert row.status == "closed" and len(uploads) == 3
            got = kit.blob_state(setup.root, row.result_version)
            assert set(got) == set(expected)
            assert all(torch.equal(got[n], expected[n]) for n in expected)
            assert row.result_version == kit.reference_version(expected, "tiny", r)
        final = kit.manifest(http, setup.tokens["alice"])
        assert final.phase == "finished" and final.round == 2
        st = status(http, setup)
        assert st.federation.finished and st.current is None
        assert [h.round for h in st.history] == [1, 2]
        assert all(h.bytes_in > 0 and h.bytes_out > 0 and h.mean_loss == pytest.approx(0.25)
                   for h in st.history)
        assert "finished" in st.note


def test_usplit_assignments_follow_the_seeded_pairs(tmp_path, kit):
    clients = ("c1", "c2", "c3", "c4", "c5")
    setup = kit.make_hub(tmp_path / "hub", method="usplit", rounds=3, seed=11, clients=clients)
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        seen = []
        for r in (1, 2, 3):
            expected = usplit_assignment(list(clients), r, 11)
            for c in clients:
                m = kit.manifest(http, setup.tokens[c])
                assert tuple(m.upload_segments) == expected[c]
                assert m.download_segments == list(SEGMENTS)  # usplit always sends everything
            seen.append(expected)
            for c, t in setup.tokens.items():
                kit.participate(http, c, t)
        assert seen[0] != seen[1] or seen[1] != seen[2]  # drawn afresh each round
        # Every segment is reported by someone in every round.
        for expected in seen:
            assert {s for segs in expected.values() for s in segs} == set(SEGMENTS)


def test_training_seeds_differ_per_client_and_round(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", rounds=2, clients=("a1", "b1"))
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        seeds = {c: kit.manifest(http, t).training.seed for c, t in setup.tokens.items()}
        assert len(set(seeds.values())) == 2
        for c, t in setup.tokens.items():
            kit.participate(http, c, t)
        seeds2 = {c: kit.manifest(http, t).training.seed for c, t in setup.tokens.items()}
        assert seeds2 != seeds


def test_a_client_enrolled_late_waits_for_the_next_round(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", method="udec", rounds=2, clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        kit.manifest(http, setup.tokens["alice"])  # round 1 opens with alice and bob
        late = kit.enrol(setup.root, "zoe")
        m = kit.manifest(http, late)
        assert m.phase == "waiting" and m.round == 1 and m.retry_after_s
        r = http.put(f"{A}/rounds/1/update", content=b"x", headers={
            "Authorization": f"Bearer {late}"})
        assert r.status_code == 409 and r.json()["code"] == "not_participant"
        for c in ("alice", "bob"):
            kit.participate(http, c, setup.tokens[c])
        m = kit.manifest(http, late)
        assert m.phase == "open" and m.round == 2
        # Its first round: the whole model, even though udec only sends the decoder later.
        assert m.download_segments == list(SEGMENTS)
        assert kit.manifest(http, setup.tokens["alice"]).download_segments == ["decoder"]


def test_a_round_opens_only_with_enough_enrolled_clients(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", min_clients=2, clients=("alice",))
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        assert kit.manifest(http, setup.tokens["alice"]).phase == "waiting"
        st = status(http, setup)
        assert st.current is None and "waits for clients" in st.note
        setup.tokens["bob"] = kit.enrol(setup.root, "bob")
        assert kit.manifest(http, setup.tokens["alice"]).phase == "open"


def test_quorum_and_deadline(tmp_path, kit, clock):
    setup = kit.make_hub(tmp_path / "hub", min_clients=2, timeout=100,
                         clients=("alice", "bob", "carol"))
    with Hub.open(setup.root, serve=True, clock=clock) as hub:
        http = kit.test_client(hub)
        kit.participate(http, "alice", setup.tokens["alice"])
        st = status(http, setup)
        assert st.current.reported == ["alice"] and not st.waiting_for_quorum
        assert st.deadline is not None and st.deadline.timestamp() == pytest.approx(
            clock.now + 100)
        clock.advance(101)
        st = status(http, setup)  # past the deadline with 1 of quorum 2: it waits and says so
        assert st.waiting_for_quorum and st.current.missing == ["bob", "carol"]
        assert "quorum" in st.note
        kit.participate(http, "bob", setup.tokens["bob"])  # quorum reached after the deadline
        _, row, uploads = kit.db_round(setup.root, 1)
        assert row.status == "closed" and [u.client for u in uploads] == ["alice", "bob"]
        assert "deadline" in row.close_reason
        m = kit.manifest(http, setup.tokens["carol"])
        assert m.phase == "finished"


def test_a_round_with_quorum_waits_for_its_deadline(tmp_path, kit, clock):
    setup = kit.make_hub(tmp_path / "hub", min_clients=1, timeout=50, rounds=2,
                         clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True, clock=clock) as hub:
        http = kit.test_client(hub)
        sent = {"alice": kit.participate(http, "alice", setup.tokens["alice"])}
        clock.advance(49)
        assert status(http, setup).current.round == 1
        assert kit.manifest(http, setup.tokens["alice"]).phase == "reported"
        clock.advance(2)
        st = status(http, setup)  # any request checks the deadline first...
        assert st.current.round == 1 and "closing" in st.note
        st = status(http, setup)  # ...and aggregates after answering
        assert st.current.round == 2 and st.history[0].reported == ["alice"]
        assert st.history[0].missing == ["bob"]
        fed, row, _ = kit.db_round(setup.root, 1)
        base = kit.blob_state(setup.root, row.base_version)
        expected = kit.reference(base, "full", 1, 0, ["alice", "bob"], sent)
        assert row.result_version == kit.reference_version(expected, "tiny", 1)
        # bob was too late for round 1 and is a participant of round 2.
        assert kit.manifest(http, setup.tokens["bob"]).round == 2


def test_admin_close_and_extend(tmp_path, kit, clock):
    setup = kit.make_hub(tmp_path / "hub", min_clients=2, timeout=60, rounds=3)
    with Hub.open(setup.root, serve=True, clock=clock) as hub:
        http = kit.test_client(hub)
        admin = setup.auth("admin")
        r = http.post(f"{A}/admin/rounds/current/extend", headers=admin, json={"seconds": 30})
        assert r.status_code == 200
        assert HubStatus.model_validate_json(r.content).deadline.timestamp() == \
            pytest.approx(clock.now + 90)
        clock.advance(200)  # long past: extending counts from now
        r = http.post(f"{A}/admin/rounds/current/extend", headers=admin, json={"seconds": 10})
        assert HubStatus.model_validate_json(r.content).deadline.timestamp() == \
            pytest.approx(clock.now + 10)
        kit.participate(http, "alice", setup.tokens["alice"])
        r = http.post(f"{A}/admin/rounds/current/close", headers=admin)  # below quorum: allowed
        assert r.status_code == 200, r.text
        st = HubStatus.model_validate_json(r.content)
        assert st.current.round == 2 and st.history[0].reported == ["alice"]
        for bad in ({"seconds": -1}, {"seconds": 0}, {}, {"seconds": "x"}, {"extra": 1}):
            r = http.post(f"{A}/admin/rounds/current/extend", headers=admin, json=bad)
            assert r.status_code == 400 and r.json()["code"] == "bad_request"
        # Closed with no report: the global model is kept and the next round opens.
        version = hub.store.federation().current_version
        r = http.post(f"{A}/admin/rounds/current/close", headers=admin)
        assert r.status_code == 200, r.text
        st = HubStatus.model_validate_json(r.content)
        assert st.current.round == 3 and st.history[1].reported == []
        fed, row, _ = kit.db_round(setup.root, 2)
        assert row.result_version == version == fed.current_version
        assert "no report" in row.close_reason
        assert kit.manifest(http, setup.tokens["bob"]).global_version == version
        for c, t in setup.tokens.items():
            kit.participate(http, c, t)
        for path in ("close", "extend"):
            r = http.post(f"{A}/admin/rounds/current/{path}", headers=admin, json={"seconds": 5})
            assert r.status_code == 409 and r.json()["code"] == "federation_finished"


def test_revoked_participant_is_not_awaited(tmp_path, kit):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        kit.participate(http, "alice", setup.tokens["alice"])
        hub.revoke_token("bob")
        r = http.get(f"{A}/manifest", headers=setup.auth("bob"))
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        assert Manifest.model_validate_json(
            http.get(f"{A}/manifest", headers=setup.auth("alice")).content).phase == "finished"


def test_a_failed_aggregation_keeps_serving_and_is_retried(tmp_path, kit, caplog):
    setup = kit.make_hub(tmp_path / "hub", clients=("alice", "bob"))
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        alice = kit.participate(http, "alice", setup.tokens["alice"])
        blob = setup.root / "blobs" / f"{alice.receipt.sha256}.safetensors"
        good = blob.read_bytes()
        blob.write_bytes(good[:-4] + b"\x00\x00\xc0\x7f")  # damaged on disk (a NaN, even)
        kit.participate(http, "bob", setup.tokens["bob"])  # the round closes; aggregation fails
        st = status(http, setup)
        assert st.current.round == 1 and "damaged" in st.note
        assert "aggregation failed" in caplog.text
        assert kit.manifest(http, setup.tokens["alice"]).phase == "reported"
        blob.write_bytes(good)
        r = http.post(f"{A}/admin/rounds/current/close", headers=setup.auth("admin"))
        assert r.status_code == 200 and HubStatus.model_validate_json(r.content).federation.finished


def test_a_long_polled_manifest_answers_when_the_next_round_opens(tmp_path, kit):
    import threading

    from .conftest import bearer

    setup = kit.make_hub(tmp_path / "hub", method="full", rounds=2)
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        kit.participate(http, "alice", setup.tokens["alice"])
        # Nothing changes: a short long poll answers "reported" when its time is up.
        r = http.get(f"{A}/manifest", params={"wait": "0.05"},
                     headers=bearer(setup.tokens["alice"]))
        assert r.status_code == 200 and Manifest.model_validate_json(r.content).phase \
            == "reported"
        assert http.get(f"{A}/manifest", params={"wait": "31"},
                        headers=bearer(setup.tokens["alice"])).status_code == 400
        answers = []

        def poll():
            answers.append(http.get(f"{A}/manifest", params={"wait": "30"},
                                    headers=bearer(setup.tokens["alice"])))

        waiter = threading.Thread(target=poll)
        waiter.start()
        while not hub.rounds.listeners and waiter.is_alive():  # the request is now held
            threading.Event().wait(0.01)
        assert waiter.is_alive(), answers
        for c in ("bob", "carol"):  # the round closes and round 2 opens
            kit.participate(http, c, setup.tokens[c])
        waiter.join(20)  # woken by the new round, well before its 30 s
        assert not waiter.is_alive()
        m = Manifest.model_validate_json(answers[0].content)
        assert m.phase == "open" and m.round == 2
        assert not hub.rounds.listeners


def test_a_lossy_downlink_serves_the_update_the_hub_applied(tmp_path, kit):
    """int8 downlink: the first version is the int8 initial payload decoded; round 2's
    manifest names the version its update is from, and that update, added to the version a
    client holds, gives the hub's new version bit for bit (udec: only the decoder is cut)."""
    from feddiffuse.shared.codecs import decode_payload, parse_codec
    from feddiffuse.shared.model import build_unet, segment_of
    from feddiffuse.shared.payloads import apply_update

    int8 = parse_codec("int8")
    setup = kit.make_hub(tmp_path / "hub", method="udec", rounds=2, seed=3,
                         clients=("alice", "bob"), downlink_codec="int8")
    shapes = {n: tuple(p.shape) for n, p in build_unet("tiny").named_parameters()}
    with Hub.open(setup.root, serve=True) as hub:
        http = kit.test_client(hub)
        auth = {"Authorization": f"Bearer {setup.tokens['alice']}"}
        m1 = kit.manifest(http, setup.tokens["alice"])
        assert (m1.uplink_codec, m1.downlink_codec, m1.delta_base) == ("fp32", "int8", None)
        r = http.get(f"{A}/models/{m1.global_version}", headers=auth)
        assert r.status_code == 200 and r.headers["x-content-sha256"] != m1.global_version
        first, _ = decode_payload(r.content, int8, shapes)
        hub_first = kit.blob_state(setup.root, m1.global_version)
        assert all(torch.equal(first[n], hub_first[n]) for n in shapes)
        for c, token in setup.tokens.items():
            m = kit.manifest(http, token)
            up = {n: s for n, s in shapes.items() if segment_of(n) in m.upload_segments}
            body = kit.encode_delta(kit.delta(up, c, 1), m, 20)
            assert http.put(f"{A}/rounds/1/update", content=body,
                            headers={"Authorization": f"Bearer {token}"}).status_code == 200
        m2 = kit.manifest(http, setup.tokens["alice"])
        assert m2.round == 2 and m2.delta_base == m1.global_version
        decoder = {n: s for n, s in shapes.items() if segment_of(n) == "decoder"}
        r = http.get(f"{A}/models/{m2.global_version}", headers=auth,
                     params={"segments": "decoder", "base": m2.delta_base})
        assert r.status_code == 200, r.text
        update, meta = decode_payload(r.content, int8, decoder)
        assert meta["feddiffuse.base_version"] == m1.global_version
        moved = apply_update(first, update)
        hub_second = kit.blob_state(setup.root, m2.global_version)
        assert all(torch.equal(moved[n], hub_second[n]) for n in decoder)
        for bad in ("0" * 64, "../../x", m2.global_version):
            r = http.get(f"{A}/models/{m2.global_version}", headers=auth, params={"base": bad})
            assert r.status_code == 404 and "download the full model" in r.json()["message"]
