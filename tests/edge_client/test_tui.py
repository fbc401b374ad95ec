"""The terminal app with App.run_test() and Pilot: setup, dashboard, cancel, samples."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from edge_fakehub import FakeHub
from edge_images import make_images
from edge_realhub import RealHub, free_port
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


async def wait_until(pilot, condition, timeout: float = 120.0, what: str = "the app"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


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
async def test_setup_to_dashboard_progress_cancel_resume_and_samples(tmp_path):
    # Long enough to cancel mid-way: Pilot's clicks wait up to a second for the process to go
    # idle, which it does not while it trains.
    hub = RealHub(tmp_path / "hub", method="ulatdec", clients=("alice",), rounds=1,
                  local_epochs=10).start_in_thread()
    images = make_images(tmp_path / "images", n=32)
    try:
        app = ClientApp(devices=DEVICES, backoff=Backoff(initial=0.05, maximum=0.3),
                        poll_s=0.2, once=True)
        async with app.run_test(size=SIZE) as pilot:
            fill_setup(app, hub.url, hub.tokens["alice"], images)
            await wait_until(pilot, lambda: "32 usable images" in text_of(
                app.screen.query_one("#folder-info", Static)), what="the folder scan")
            await pilot.click("#join")
            await wait_until(pilot, lambda: isinstance(app.screen, Dashboard),
                             what="the dashboard")
            dash = app.screen
            assert Settings.load().hub_url == hub.url  # settings persist for the next run

            # Progress arrives from the worker thread while the UI stays responsive.
            train = dash.query_one("#train", TaskProgress)
            await wait_until(pilot, lambda: (train.bar.progress or 0) > 0,
                             what="training progress")
            assert dash.query_one("#download", TaskProgress).bar.percentage == 1.0
            assert "Round 1 of 1" in text_of(dash.query_one("#round", Static))
            assert "ulatdec" in text_of(dash.query_one("#federation", Static))

            await pilot.click("#cancel")
            await wait_until(pilot, lambda: not dash.running, what="the cancel")
            assert "training stopped" in text_of(dash.query_one("#phase", Static)), log_text(
                dash)
            assert not hub.received()

            await pilot.click("#start")  # resume from the last checkpoint and finish
            await wait_until(pilot, lambda: "Done: round(s) 1" in text_of(
                dash.query_one("#phase", Static)), timeout=240, what="the round")
            assert "bottleneck, decoder" in text_of(dash.query_one("#segments", Static))
            assert len(dash.losses) >= 2
            assert [r.client for r in hub.received()] == ["alice"]

            await pilot.press("s")
            await wait_until(pilot, lambda: isinstance(app.screen, SamplesScreen))
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
            await wait_until(pilot, lambda: isinstance(app.screen, Dashboard))
    finally:
        hub.stop()


async def test_cancel_stops_training_at_the_next_step(tmp_path):
    hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=50)
    images = make_images(tmp_path / "images", n=16)
    app = ClientApp(http_factory=hub.http_factory(), devices=DEVICES, once=True)
    async with app.run_test(size=SIZE) as pilot:
        fill_setup(app, "http://hub.test", "token-client-a", images)
        await pilot.click("#join")
        await wait_until(pilot, lambda: isinstance(app.screen, Dashboard))
        dash = app.screen
        await wait_until(pilot, lambda: len(dash.losses) >= 1, what="a training step")
        await pilot.press("c")
        started = time.monotonic()
        await wait_until(pilot, lambda: not dash.running, timeout=30, what="the cancel")
        assert time.monotonic() - started < 10
        assert "Stopped: training stopped" in log_text(dash)
        assert not hub.uploads


@pytest.mark.parametrize("url, token, data, expected", [
    ("hub.example.org", "t", "IMAGES", "is not a valid hub URL"),
    ("http://127.0.0.1:PORT", "t", "IMAGES", "Cannot reach a hub at"),
    ("http://hub.test", "token-client-a", "EMPTY", "No PNG or JPEG images found"),
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
        await wait_until(pilot, lambda: isinstance(app.screen, FolderPicker))
        picker = app.screen
        scan = picker.query_one("#picker-scan", Static)
        await wait_until(pilot, lambda: "5 usable images" in text_of(scan),
                         what="the first scan")
        await pilot.press("down")  # "cats" (sorted first)
        await wait_until(pilot, lambda: picker.highlighted.name == "cats")
        await wait_until(pilot, lambda: "cats: 5 usable images" in text_of(scan))
        await pilot.click("#choose")
        await wait_until(pilot, lambda: isinstance(app.screen, SetupScreen))
        assert app.screen.query_one("#data-dir", Input).value == str(tmp_path / "photos" /
                                                                      "cats")


async def test_dashboard_shows_events_posted_by_the_worker(tmp_path):
    """The message handlers alone: events become progress, a sparkline and log lines."""
    from feddiffuse.edge_client.inputs import scan_image_folder
    from feddiffuse.edge_client.session import Joined
    from feddiffuse.edge_client.state import HubStore

    images = make_images(tmp_path / "images", n=4)
    joined = Joined("http://hub.test", "t", images, "cpu", "cpu (as asked)",
                    scan_image_folder(images), HubStore("http://hub.test"), None)
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=SIZE) as pilot:
        app.open_dashboard(joined)
        await wait_until(pilot, lambda: isinstance(app.screen, Dashboard))
        dash = app.screen
        for event in (ev.ProgressEvent("download", 50, 100), ev.LossEvent(1, 1, 0.5),
                      ev.LossEvent(1, 2, 0.4), ev.LogEvent("hello", "warning"),
                      ev.RetryEvent("uploading", 1, 2.0, "connection refused")):
            dash.post_message(Dashboard.Update(event))
        await pilot.pause(0.2)
        assert dash.query_one("#download", TaskProgress).bar.percentage == 0.5
        assert dash.losses == [0.5, 0.4]
        text = log_text(dash)
        assert "! hello" in text and "connection refused" in text


async def test_settings_persist_and_the_hub_can_be_rejoined(tmp_path):
    hub = FakeHub(method="full", clients=("client-a",), rounds=1, local_epochs=50)
    images = make_images(tmp_path / "images", n=8)
    app = ClientApp(http_factory=hub.http_factory(), devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        fill_setup(app, "http://hub.test", "token-client-a", images)
        app.screen.query_one("#device").value = "cpu"
        await pilot.click("#join")
        await wait_until(pilot, lambda: isinstance(app.screen, Dashboard))
        await wait_until(pilot, lambda: len(app.screen.losses) >= 1, what="training")
        app.screen.action_setup()  # back to setup: the loop stops at its next step
        await wait_until(pilot, lambda: isinstance(app.screen, SetupScreen)
                         and bool(app.screen.query("#join")))
        await pilot.pause()
        await pilot.click("#join")  # the same hub again, while the old loop winds down
        await wait_until(pilot, lambda: isinstance(app.screen, Dashboard))
        dash = app.screen
        await wait_until(pilot, lambda: "resuming from the checkpoint" in log_text(dash)
                         or len(dash.losses) >= 1, what="the second run")
        assert "already working" not in log_text(dash)
        dash.action_cancel()
        await wait_until(pilot, lambda: not dash.running)
    second = ClientApp(devices=DEVICES)
    async with second.run_test(size=SIZE):
        screen = second.screen
        assert screen.query_one("#hub-url", Input).value == "http://hub.test"
        assert screen.query_one("#token", Input).value == "token-client-a"
        assert screen.query_one("#data-dir", Input).value == str(images.resolve())
        assert screen.query_one("#device").value == "cpu"
