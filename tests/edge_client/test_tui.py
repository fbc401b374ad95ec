"""The terminal app with App.run_test() and Pilot: setup, dashboard, cancel, samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_fakehub import FakeHub
from edge_images import make_images
from edge_realhub import RealHub, free_port
from edge_sync import TrainingGate, on_screen, wait_until
from textual.widgets import Input, RichLog, Static

from feddiffuse.edge_client import events as ev
from feddiffuse.edge_client.backoff import Backoff
from feddiffuse.edge_client.settings import Settings, client_home
from feddiffuse.edge_client.tui.app import ClientApp
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard
from feddiffuse.edge_client.tui.screens.folder_picker import FolderPicker
from feddiffuse.edge_client.tui.screens.samples import SamplesScreen
from feddiffuse.edge_client.tui.screens.setup import SetupScreen
from feddiffuse.edge_client.tui.widgets.image_view import ImageView
from feddiffuse.edge_client.tui.widgets.task_progress import TaskProgress

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests on asyncio

DEVICES = [("Auto: CPU (no CUDA GPU or Apple MPS found)", "auto"), ("CPU", "cpu")]
SIZE = (100, 40)


def fill_setup(app: ClientApp, url: str, token: str, data: Path | str) -> None:
    screen = app.screen
    assert isinstance(screen, SetupScreen)
    screen.query_one("#hub-url", Input).value = url
    screen.query_one("#token", Input).value = token
    screen.query_one("#data-dir", Input).value = str(data)


def text_of(widget: Static) -> str:
    return str(widget.render())


def log_text(dashboard: Dashboard) -> str:
    return "\n".join(line.text for line in dashboard.query_one("#events", RichLog).lines)


@pytest.mark.slow
async def test_setup_to_dashboard_progress_cancel_resume_and_samples(tmp_path, monkeypatch):
    # Training holds right after the checkpoint of epoch 1 until Cancel has been pressed, so
    # the cancel lands mid-round however fast or slow the machine is.
    gate = TrainingGate(monkeypatch, hold_after_epoch=1)
    hub = RealHub(tmp_path / "hub", method="ulatdec", clients=("alice",), rounds=1,
                  local_epochs=2).start_in_thread()
    images = make_images(tmp_path / "images", n=32)
    try:
        app = ClientApp(devices=DEVICES, backoff=Backoff(initial=0.05, maximum=0.3),
                        poll_s=0.2, once=True)
        async with app.run_test(size=SIZE) as pilot:
            fill_setup(app, hub.url, hub.tokens["alice"], images)
            await wait_until(pilot, lambda: "32 usable images" in text_of(
                app.screen.query_one("#folder-info", Static)), what="the folder scan")
            await pilot.click("#join")
            await wait_until(pilot, lambda: on_screen(app, Dashboard),
                             what="the dashboard")
            dash = app.screen
            assert Settings.load().hub_url == hub.url  # settings persist for the next run

            # Progress arrives from the worker thread while the UI stays responsive.
            train = dash.query_one("#train", TaskProgress)
            await wait_until(pilot, lambda: gate.held(0), what="the end of epoch 1")
            await wait_until(pilot, lambda: (train.bar.progress or 0) > 0,
                             what="training progress")
            assert dash.query_one("#download", TaskProgress).bar.percentage == 1.0
            assert "Round 1 of 1" in text_of(dash.query_one("#round", Static))
            assert "ulatdec" in text_of(dash.query_one("#federation", Static))

            await pilot.click("#cancel")
            await wait_until(pilot, dash.stop_event.is_set, what="the Cancel click")
            assert dash.running  # still training (held), so the cancel is what stops it
            gate.release(0)
            await wait_until(pilot, lambda: not dash.running, what="the cancel")
            assert gate.runs[0].steps_after_release == 0  # stopped at the next step
            assert "training stopped; 1 of 2 epoch(s)" in text_of(
                dash.query_one("#phase", Static)), log_text(dash)
            assert not hub.received()

            await pilot.click("#start")  # resume from the last checkpoint and finish
            # The only round was the last one: the client stays for the final model.
            await wait_until(pilot, lambda: "is finished after 1 rounds: its final model" in
                             text_of(dash.query_one("#phase", Static)), what="the round")
            assert "resuming from the checkpoint of epoch 1/2" in log_text(dash)
            assert len(gate.runs) == 2 and not gate.runs[1].result.stopped
            assert "bottleneck, decoder" in text_of(dash.query_one("#segments", Static))
            assert len(dash.losses) >= 2
            assert [r.client for r in hub.received()] == ["alice"]

            await pilot.press("s")
            await wait_until(pilot, lambda: on_screen(app, SamplesScreen))
            samples = app.screen
            samples.query_one("#count", Input).value = "4"
            samples.query_one("#steps", Input).value = "2"
            await pilot.click("#generate")
            await wait_until(pilot, lambda: samples.result is not None, what="the samples")
            path = samples.result.path
            assert path.is_file() and path.parent == dash.joined.store.samples_dir
            assert str(path) in text_of(samples.query_one("#sample-status", Static))
            assert samples.query_one("#grid", ImageView).image is not None
            await pilot.press("escape")
            await wait_until(pilot, lambda: on_screen(app, Dashboard))
    finally:
        gate.close()
        hub.stop()


async def test_cancel_stops_training_at_the_next_step(tmp_path, monkeypatch):
    # 16 images in batches of 8: two steps per epoch. Training holds after its first step
    # until "c" has been pressed; the stop must come before a second step is taken.
    gate = TrainingGate(monkeypatch, hold_after_step=1)
    hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=2)
    images = make_images(tmp_path / "images", n=16)
    app = ClientApp(http_factory=hub.http_factory(), devices=DEVICES, once=True)
    try:
        async with app.run_test(size=SIZE) as pilot:
            fill_setup(app, "http://hub.test", "token-client-a", images)
            await pilot.click("#join")
            await wait_until(pilot, lambda: on_screen(app, Dashboard))
            dash = app.screen
            await wait_until(pilot, lambda: gate.held(0), what="the first training step")
            await wait_until(pilot, lambda: len(dash.losses) >= 1, what="its loss")
            await pilot.press("c")
            await wait_until(pilot, dash.stop_event.is_set, what="the cancel key")
            gate.release(0)
            await wait_until(pilot, lambda: not dash.running, what="the cancel")
            run = gate.runs[0]
            assert run.result.stopped and run.steps == 1 and run.steps_after_release == 0
            assert "Stopped: training stopped; 0 of 2 epoch(s)" in log_text(dash)
            assert not hub.uploads
    finally:
        gate.close()


@pytest.mark.parametrize("url, token, data, expected", [
    ("hub.example.org", "t", "IMAGES", "is not a valid hub URL"),
    ("http://127.0.0.1:PORT", "t", "IMAGES", "Cannot reach a hub at"),
    ("http://hub.test", "token-client-a", "EMPTY", "No images found"),
    ("http://hub.test", "wrong-token", "IMAGES", "wrong or has been revoked"),
])
async def test_bad_input_is_one_sentence_and_nothing_is_written(tmp_path, url, token, data,
                                                                expected):
    hub = FakeHub(clients=("client-a",))
    images = make_images(tmp_path / "images", n=4)
    (tmp_path / "empty").mkdir()
    folder = images if data == "IMAGES" else tmp_path / "empty"
    url = url.replace("PORT", str(free_port()))
    factory = hub.http_factory() if url == "http://hub.test" else None
    app = ClientApp(http_factory=factory, devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        fill_setup(app, url, token, folder)
        await pilot.click("#join")
        error = app.screen.query_one("#setup-error", Static)
        await wait_until(pilot, lambda: error.has_class("-bad"), what="the error")
        sentence = text_of(error)
        assert expected in sentence
        assert sentence.endswith(".") and "\n" not in sentence
        assert isinstance(app.screen, SetupScreen)
    assert not client_home().exists()


async def test_folder_browser_shows_counts_and_fills_the_folder(tmp_path, monkeypatch):
    make_images(tmp_path / "photos" / "cats", n=5)
    (tmp_path / "photos" / "empty").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#data-dir", Input).value = str(tmp_path / "photos")
        await pilot.click("#browse")
        await wait_until(pilot, lambda: on_screen(app, FolderPicker))
        picker = app.screen
        scan = picker.query_one("#picker-scan", Static)
        await wait_until(pilot, lambda: "5 usable images" in text_of(scan),
                         what="the first scan")
        await pilot.press("down", "down")  # past "..": "cats" (sorted first)
        await wait_until(pilot, lambda: picker.highlighted.name == "cats")
        await wait_until(pilot, lambda: "cats: 5 usable images" in text_of(scan))
        await pilot.click("#choose")
        await wait_until(pilot, lambda: on_screen(app, SetupScreen))
        assert app.screen.query_one("#data-dir", Input).value == str(tmp_path / "photos" /
                                                                      "cats")


async def test_dashboard_shows_events_posted_by_the_worker(tmp_path):
    """The message handlers alone: events become progress, a sparkline and log lines."""
    from feddiffuse.edge_client.inputs import scan_image_folder
    from feddiffuse.edge_client.session import Joined
    from feddiffuse.edge_client.state import HubFolder

    images = make_images(tmp_path / "images", n=4)
    joined = Joined("http://hub.test", "t", images, "cpu", "cpu (as asked)",
                    scan_image_folder(images), HubFolder("http://hub.test"), None)
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=SIZE) as pilot:
        app.open_dashboard(joined)
        await wait_until(pilot, lambda: on_screen(app, Dashboard))
        dash = app.screen
        for event in (ev.ProgressEvent("download", 50, 100), ev.LossEvent(1, 1, 0.5),
                      ev.LossEvent(1, 2, 0.4), ev.LogEvent("hello", "warning"),
                      ev.RetryEvent("uploading", 1, 2.0, "connection refused")):
            dash.post_message(Dashboard.Update(event))
        # Messages are handled in order: once the last one shows, all of them have been.
        await wait_until(pilot, lambda: "connection refused" in log_text(dash),
                         what="the last event")
        assert dash.query_one("#download", TaskProgress).bar.percentage == 0.5
        assert dash.losses == [0.5, 0.4]
        text = log_text(dash)
        assert "! hello" in text and "connection refused" in text


async def test_settings_persist_and_the_hub_can_be_rejoined(tmp_path, monkeypatch):
    # 8 images in one batch: one step per epoch. Every run holds after its first step (the
    # first run in epoch 1, the resumed one in epoch 2 of 3), so the first loop is surely
    # still running, holding the hub's lock, when the same hub is joined again, and the
    # second one cannot finish before it is cancelled.
    gate = TrainingGate(monkeypatch, hold_after_step=1)
    hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=3)
    images = make_images(tmp_path / "images", n=8)
    app = ClientApp(http_factory=hub.http_factory(), devices=DEVICES)
    try:
        async with app.run_test(size=SIZE) as pilot:
            fill_setup(app, "http://hub.test", "token-client-a", images)
            app.screen.query_one("#device").value = "cpu"
            await pilot.click("#join")
            await wait_until(pilot, lambda: on_screen(app, Dashboard))
            first = app.screen
            await wait_until(pilot, lambda: gate.held(0), what="training")
            first.action_setup()  # back to setup: the loop stops at its next step
            assert first.stop_event.is_set()
            await wait_until(pilot, lambda: on_screen(app, SetupScreen)
                             and bool(app.screen.query("#join")))
            await pilot.pause()
            await pilot.click("#join")  # the same hub again, while the old loop still runs
            await wait_until(pilot, lambda: on_screen(app, Dashboard))
            dash = app.screen
            assert not gate.runs[0].done.is_set()  # the old loop is still in its step
            gate.release(0)  # now it winds down while the new dashboard waits for the lock
            await wait_until(pilot, lambda: gate.held(1), what="the second run")
            assert gate.runs[0].result.stopped and gate.runs[0].steps_after_release == 0
            await wait_until(pilot, lambda: "resuming from the checkpoint of epoch 1/3"
                             in log_text(dash), what="the resume line")
            dash.action_cancel()
            gate.release(1)
            await wait_until(pilot, lambda: not dash.running)
            text = log_text(dash)
            assert "Stopped: training stopped; 2 of 3 epoch(s)" in text, text
            assert "already working" not in text
            assert not hub.uploads
    finally:
        gate.close()
    # The next start lands on the dashboard of that hub (not started here: the fake hub is
    # gone), and Setup still holds every choice.
    second = ClientApp(devices=DEVICES, autostart=False)
    async with second.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: on_screen(second, Dashboard), what="the dashboard")
        assert second.screen.joined.url == "http://hub.test"
        await pilot.press("e")
        await wait_until(pilot, lambda: on_screen(second, SetupScreen), what="Setup")
        screen = second.screen
        assert screen.query_one("#hub-url", Input).value == "http://hub.test"
        assert screen.query_one("#token", Input).value == "token-client-a"
        assert screen.query_one("#data-dir", Input).value == str(images.resolve())
        assert screen.query_one("#device").value == "cpu"
