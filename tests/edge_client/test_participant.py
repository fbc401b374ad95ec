"""The participant loop against the fake hub: rounds, methods, personal segments, resume, faults."""

from __future__ import annotations

import threading

import pytest
import torch
from edge_fakehub import FakeHub
from edge_images import make_images

from feddiffuse.edge_client import events as ev
from feddiffuse.edge_client.errors import Cancelled, TokenRejected
from feddiffuse.edge_client.hub_client import HubClient
from feddiffuse.edge_client.participant import Participant, ParticipantOptions
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.model import SEGMENTS


class Client:
    """One data owner: its own state folder, images and token."""

    def __init__(self, hub: FakeHub, client_id: str, tmp_path, backoff, n_images=16):
        self.hub = hub
        self.client_id = client_id
        self.store = HubFolder("http://hub.test", home=tmp_path / client_id / "home")
        self.images = make_images(tmp_path / client_id / "images", n=n_images,
                                  seed=len(client_id))
        self.backoff = backoff
        self.events: list = []

    def participant(self, once=True, stop=None, emit=None) -> Participant:
        http = HubClient("http://hub.test", f"token-{self.client_id}",
                         transport=self.hub.transport())
        options = ParticipantOptions(data_dir=self.images, device="cpu", once=once,
                                     await_final=False,
                                     backoff=self.backoff, poll_s=0.01)

        def record(event):
            self.events.append(event)
            if emit is not None:
                emit(event)

        return Participant(http, self.store, options, record, stop)

    def run(self, **kwargs):
        return self.participant(**kwargs).run()

    def logs(self) -> list[str]:
        return [e.message for e in self.events if isinstance(e, ev.LogEvent)]


def names_of(hub: FakeHub, segments) -> set[str]:
    return {n for n, s in hub.segment_of.items() if s in segments}


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_two_clients_two_rounds_upload_only_their_segments(method, tmp_path, quick_backoff):
    hub = FakeHub(method=method, clients=("client-a", "client-b"), rounds=2)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    b = Client(hub, "client-b", tmp_path, quick_backoff)
    for _round in (1, 2):
        assert a.run().rounds_done == [_round]
        assert b.run().rounds_done == [_round]
    assert hub.finished
    assert len(hub.uploads) == 4
    personal = set(personal_segments(method))
    for upload in hub.uploads:
        assigned = hub_plan_upload(method, upload)
        assert upload.names == names_of(hub, assigned)
        assert not upload.names & names_of(hub, personal)
        assert upload.metadata["feddiffuse.kind"] == "delta"
        assert upload.num_samples == 16
        assert "feddiffuse.mean_loss" in upload.metadata
    for client in (a, b):
        info = client.store.load_info()
        assert info.last_reported_round == 2 and info.method == method
        assert client.store.personal_path.is_file() == bool(personal)
        assert not client.store.rounds_in_progress()
        outcome = client.run()
        assert outcome.finished and client.store.load_info().finished
        held = client.store.load_global()
        assert held.version == hub.version
        shared = [s for s in SEGMENTS if s not in personal]
        for name in names_of(hub, shared):
            assert torch.equal(held.tensors[name], hub.global_state[name])


def hub_plan_upload(method, upload):
    from feddiffuse.shared.methods import plan_round

    return plan_round(method, ["client-a", "client-b"], upload.round, 0)[upload.client_id].upload


def test_second_round_downloads_only_what_the_manifest_names(tmp_path, quick_backoff):
    hub = FakeHub(method="udec", clients=("client-a",), rounds=2)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    a.run()
    a.run()
    downloads = [r for r in hub.requests if r.startswith("GET /api/v1/models/")]
    assert len(downloads) == 2
    phases = [e.detail for e in a.events if isinstance(e, ev.PhaseEvent)
              and e.phase == "downloading"]
    assert "downloading encoder, bottleneck, decoder of" in phases[0]
    assert "downloading decoder of" in phases[1]


def test_cancel_then_resume_from_the_last_epoch_checkpoint(tmp_path, quick_backoff):
    hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=3)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    stop = threading.Event()

    def stop_after_first_epoch(event):
        if isinstance(event, ev.EpochEvent) and event.epoch == 1:
            stop.set()

    with pytest.raises(Cancelled, match="1 of 3"):
        a.run(stop=stop, emit=stop_after_first_epoch)
    round_dir = a.store.round_dir(1, hub.version)
    assert a.store.latest_checkpoint(round_dir)[0] == 1
    assert not hub.uploads
    a.events.clear()
    assert a.run().rounds_done == [1]
    epochs = [e.epoch for e in a.events if isinstance(e, ev.EpochEvent)]
    assert epochs == [2, 3]
    assert any("resuming from the checkpoint of epoch 1/3" in m for m in a.logs())
    assert not any(e.phase == "downloading" for e in a.events if isinstance(e, ev.PhaseEvent))
    assert hub.finished and len(hub.uploads) == 1


def test_a_resumed_round_uploads_exactly_what_an_uninterrupted_one_does(tmp_path, quick_backoff):
    # The epoch checkpoint holds Adam's state too, so resuming changes nothing in the result.
    results = []
    for interrupted in (False, True):
        hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=2)
        a = Client(hub, "client-a", tmp_path / str(interrupted), quick_backoff)
        if interrupted:
            stop = threading.Event()
            with pytest.raises(Cancelled):
                a.run(stop=stop, emit=lambda e, s=stop: isinstance(e, ev.EpochEvent) and s.set())
        assert a.run().rounds_done == [1]
        results.append(hub.global_state)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_faults_are_retried_without_user_action(tmp_path, quick_backoff):
    hub = FakeHub(method="full", clients=("client-a", "client-b"), rounds=2)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    b = Client(hub, "client-b", tmp_path, quick_backoff)
    hub.faults.refuse = 3
    hub.faults.errors_503 = 1
    hub.faults.cut_downloads = 1
    hub.faults.drop_uploads = 1
    assert a.run().rounds_done == [1]
    retries = [e for e in a.events if isinstance(e, ev.RetryEvent)]
    assert len(retries) == 6
    assert {"refused", "503", "cut download", "dropped upload"} <= set(hub.faults.log)
    assert any(e.startswith("range ") for e in hub.faults.log)
    b.run()
    # The hub records a's upload but the answer is lost: the retry meets a 409, the client
    # asks for the manifest again, sees that the hub has its report and carries on.
    hub.faults.lose_upload_response = 1
    assert a.run().rounds_done == [2]
    assert any("receipt was lost" in m for m in a.logs())
    assert a.store.load_info().last_reported_round == 2
    b.run()
    assert hub.finished and len(hub.uploads) == 4


def test_a_round_that_moved_on_is_rejoined(tmp_path, quick_backoff):
    hub = FakeHub(method="full", clients=("client-a", "client-b"), rounds=3)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    original = hub._upload
    moved = []

    def close_round_first(request, client_id, round_index):
        if client_id == "client-a" and not moved:
            # The round ends without client-a (as a deadline would); a then meets a 409.
            moved.append(round_index)
            hub.round += 1
            hub._open_round()
        return original(request, client_id, round_index)

    hub._upload = close_round_first
    assert a.run().rounds_done == [2]
    warnings = [e for e in a.events if isinstance(e, ev.LogEvent) and e.level == "warning"]
    assert any("round moved on" in w.message and "rejoining" in w.message for w in warnings)
    assert [u.round for u in hub.uploads] == [2]


def test_revoked_token_stops_the_loop(tmp_path, quick_backoff):
    hub = FakeHub(method="full", clients=("client-a",))
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    hub.revoked.add("token-client-a")
    with pytest.raises(TokenRejected):
        a.run()


def test_waiting_clients_poll_until_their_round_opens(tmp_path, quick_backoff):
    hub = FakeHub(method="full", clients=("client-a", "client-b"), rounds=2)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    b = Client(hub, "client-b", tmp_path, quick_backoff)
    a.run()  # round 1 reported; a now waits for b
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("a", a.run()))
    thread.start()
    b.run()
    thread.join(timeout=60)
    assert result["a"].rounds_done == [2]
    assert any(e.phase == "waiting" for e in a.events if isinstance(e, ev.PhaseEvent))


def test_a_new_federation_behind_the_same_url_sets_old_weights_aside(tmp_path, quick_backoff):
    old = FakeHub(method="udec", clients=("client-a",), rounds=1)
    a = Client(old, "client-a", tmp_path, quick_backoff)
    a.run()
    assert a.store.personal_path.is_file()
    new = FakeHub(method="full", clients=("client-a",), rounds=1, seed=1)
    a.hub = new
    assert a.run().rounds_done == [1]
    assert not a.store.personal_path.is_file()
    assert list((a.store.root / "previous").rglob("personal.safetensors"))
    assert any("set aside" in m for m in a.logs())
    assert new.uploads[0].names == set(new.segment_of)


def test_auto_device_trains_and_samples_where_select_device_says(tmp_path, quick_backoff):
    """On a CUDA (or MPS) machine this runs the round and the sampler on the accelerator."""
    from feddiffuse.edge_client.participant import describe_device
    from feddiffuse.edge_client.sampling import sample_grid

    hub = FakeHub(method="ulatdec", clients=("client-a",), rounds=1)
    a = Client(hub, "client-a", tmp_path, quick_backoff)
    participant = a.participant()
    participant.options.device = "auto"
    assert participant.run().rounds_done == [1]
    device, reason = describe_device("auto")
    shown = [e for e in a.events if isinstance(e, ev.DeviceEvent)]
    assert shown == [ev.DeviceEvent(str(device), reason)]
    result = sample_grid(a.store, 4, 2, tmp_path / "grid.png", device="auto")
    assert result.path.is_file() and result.images.shape == (4, 1, 28, 28)
    assert "with this client's own encoder" in result.description


@pytest.mark.parametrize("interruption", ["cancelled in round 2", "receipt of round 1 lost"])
def test_error_feedback_survives_interruptions_bit_for_bit(interruption, tmp_path,
                                                           quick_backoff):
    """Top-k uploads carry what earlier rounds left out (error feedback). The residual lives
    with the round's work until the hub holds the upload, so a round resumed after a stop, or
    an upload whose receipt was lost, leaves the client uploading exactly the bytes of an
    undisturbed run."""
    def federation(folder, disturb: bool) -> list[bytes]:
        hub = FakeHub(method="full", clients=("client-a", "client-b"), rounds=2,
                      local_epochs=2, uplink_codec="topk:0.05")
        a = Client(hub, "client-a", folder, quick_backoff)
        b = Client(hub, "client-b", folder, quick_backoff)
        if disturb and interruption == "receipt of round 1 lost":
            hub.faults.lose_upload_response = 1  # the hub holds it; the client learns later
        assert a.run().rounds_done == [1]
        assert a.store.residual_path.is_file()  # what round 1 did not send
        assert b.run().rounds_done == [1]
        if disturb and interruption == "cancelled in round 2":
            stop = threading.Event()
            with pytest.raises(Cancelled):
                a.run(stop=stop, emit=lambda e, s=stop: isinstance(e, ev.EpochEvent) and s.set())
        assert a.run().rounds_done == [2]
        return [u.body for u in hub.uploads if u.client_id == "client-a"]

    undisturbed = federation(tmp_path / "calm", disturb=False)
    disturbed = federation(tmp_path / "disturbed", disturb=True)
    assert len(undisturbed) == 2 and disturbed == undisturbed
    # the feedback is real: round 2's update is not what top-k of its own delta would be
    assert undisturbed[0] != undisturbed[1]
