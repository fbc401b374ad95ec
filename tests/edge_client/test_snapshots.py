"""Snapshot tests of the terminal app's screens (pytest-textual-snapshot).

Update the stored SVGs after an intended change with `pytest tests/edge_client/test_snapshots.py
--snapshot-update`, and look at them before committing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_textual_snapshot")

from edge_sync import on_screen, wait_until  # noqa: E402
from textual.widgets import Input, RichLog  # noqa: E402

from feddiffuse.edge_client import events as ev  # noqa: E402
from feddiffuse.edge_client.inputs import FolderScan  # noqa: E402
from feddiffuse.edge_client.sampling import SampleResult  # noqa: E402
from feddiffuse.edge_client.session import Joined  # noqa: E402
from feddiffuse.edge_client.state import HubFolder  # noqa: E402
from feddiffuse.edge_client.tui.app import ClientApp  # noqa: E402
from feddiffuse.edge_client.tui.screens import dashboard  # noqa: E402
from feddiffuse.edge_client.tui.screens.confirm_quit import ConfirmQuit  # noqa: E402
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard  # noqa: E402
from feddiffuse.edge_client.tui.screens.help import HelpScreen  # noqa: E402
from feddiffuse.edge_client.tui.screens.samples import SamplesScreen  # noqa: E402
from feddiffuse.edge_client.tui.screens.setup import SetupScreen  # noqa: E402
from feddiffuse.edge_client.tui.widgets.image_view import ImageView  # noqa: E402
from feddiffuse.shared.protocol import Manifest, TrainingSettings  # noqa: E402

DEVICES = [("Auto: CPU (no CUDA GPU or Apple MPS found)", "auto"), ("CPU", "cpu")]
SIZES = [pytest.param((120, 40), id="120x40"), pytest.param((80, 24), id="80x24")]
URL = "http://hub.example.org:8000"


def still(app: ClientApp) -> ClientApp:
    """No animation: indeterminate progress bars are drawn the same at every moment."""
    app.animation_level = "none"
    return app


def joined() -> Joined:
    scan = FolderScan(Path("/data/images"), files=64, usable=64, probed=64,
                      total_bytes=52_900, sizes=Counter({(28, 28): 64}))
    return Joined(URL, "token", Path("/data/images"), "cpu", "cpu (CPU, as asked)", scan,
                  HubFolder(URL), None)


def manifest() -> Manifest:
    return Manifest(federation="clinic-study", client_id="alice", phase="open", round=2,
                    rounds=15, method="usplit", preset="tiny", global_version="ab" * 32,
                    download_segments=["encoder", "bottleneck", "decoder"],
                    upload_segments=["encoder", "bottleneck"],
                    training=TrainingSettings(local_epochs=5, batch_size=128, lr=1e-4))


async def no_focus(pilot):
    # After Setup has focused its first field, or that would come after this.
    await wait_until(pilot, lambda: on_screen(pilot.app, SetupScreen), what="Setup")
    pilot.app.screen.set_focus(None)  # no blinking cursor in the picture
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_setup_screen(snap_compare, size):
    assert snap_compare(still(ClientApp(devices=DEVICES)), terminal_size=size,
                        run_before=no_focus)


@pytest.mark.parametrize("size", SIZES)
def test_setup_screen_with_a_bad_url(snap_compare, size):
    shown: list[str] = []

    async def fill(pilot):
        screen = pilot.app.screen
        screen.query_one("#hub-url", Input).value = "hub.example.org"
        screen.query_one("#token", Input).value = "secret"
        await pilot.click("#join")
        error = screen.query_one("#setup-error")
        # The check runs in a worker: wait for its sentence, however long that takes; a
        # picture taken before it shows would only compare "Checking the hub...".
        await wait_until(pilot, lambda: error.has_class("-bad"), what="the URL error")
        shown.append(str(error.render()))

    matches = snap_compare(still(ClientApp(devices=DEVICES)), terminal_size=size,
                           run_before=fill)
    assert shown and "is not a valid hub URL" in shown[0], "the error was never displayed"
    assert matches


@pytest.mark.parametrize("size", SIZES)
def test_dashboard(snap_compare, monkeypatch, size):
    monkeypatch.setattr(dashboard, "clock_time", lambda: "12:00:00")

    async def feed(pilot):
        pilot.app.open_dashboard(joined())
        await wait_until(pilot, lambda: on_screen(pilot.app, Dashboard), what="the dashboard")
        screen = pilot.app.screen
        for event in (
            ev.DeviceEvent("cpu", "CPU, as asked"),
            ev.RoundEvent(manifest()),
            ev.PhaseEvent("training", "round 2: training 5 local epoch(s) on 64 images (cpu)"),
            ev.ProgressEvent("download", 4_054_188, 4_054_188),
            *(ev.LossEvent(1, i, 0.5 - 0.01 * i + 0.02 * (i % 3)) for i in range(1, 30)),
            ev.LogEvent("Round 2: epoch 1/5 loss 0.3112 (66 img/s)."),
            ev.RetryEvent("fetching the round manifest", 1, 1.4, "connection refused"),
        ):
            screen.post_message(Dashboard.Update(event))
        # Handled in order: once the last event's line is in the log, all of them are shown.
        log = screen.query_one("#events", RichLog)
        await wait_until(pilot, lambda: any("connection refused" in line.text
                                            for line in log.lines), what="the last event")

    app = still(ClientApp(devices=DEVICES, autostart=False))
    assert snap_compare(app, terminal_size=size, run_before=feed)


@pytest.mark.parametrize("size", SIZES)
def test_samples_screen_with_a_grid(snap_compare, size):
    y, x = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    # 16 images: a 4 x 4 grid, which must fit whole at 80 columns as at 120.
    images = torch.stack([(torch.cos(3 * (x * k + y * (1 + j % 2))) * 0.9).unsqueeze(0)
                          for j, k in enumerate(torch.linspace(0.5, 2.0, 16).tolist())])

    async def show(pilot):
        pilot.app.push_screen(SamplesScreen(joined()))
        await wait_until(pilot, lambda: on_screen(pilot.app, SamplesScreen),
                         what="the samples screen")
        result = SampleResult(Path("/data/samples/grid.png"), images,
                              "16 samples from the global model abababababab, DDIM 50 steps")
        pilot.app.screen.post_message(SamplesScreen.Done(
            result, f"{result.description}. Saved to {result.path}"))
        pilot.app.screen.set_focus(None)  # no blinking cursor in the picture
        screen = pilot.app.screen
        await wait_until(pilot, lambda: screen.result is result, what="the grid")
        view = screen.query_one("#grid", ImageView)
        # The label follows the view's Scaled message: wait for it, not just for the scale.
        await wait_until(pilot, lambda: "Scaled to fit" in str(
            screen.query_one("#grid-scale").render()), what="the grid's scale line")
        assert view.fit and view.scale is not None

    assert snap_compare(still(ClientApp(devices=DEVICES)), terminal_size=size, run_before=show)


def finished_joined() -> Joined:
    j = joined()
    j.store.update_info(federation="clinic-study", method="usplit", preset="tiny", rounds=15,
                        client_id="alice", global_version="cd" * 32, global_round=15,
                        finished=True)
    return j


def test_dashboard_of_a_finished_federation_at_80x24(snap_compare, monkeypatch):
    """Item 7 and the small terminal: finished, with its model, and the buttons visible."""
    monkeypatch.setattr(dashboard, "clock_time", lambda: "12:00:00")

    async def show(pilot):
        pilot.app.open_dashboard(finished_joined())
        await wait_until(pilot, lambda: on_screen(pilot.app, Dashboard), what="the dashboard")

    app = still(ClientApp(devices=DEVICES, autostart=True))
    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


def test_quit_confirmation_while_training(snap_compare, monkeypatch):
    monkeypatch.setattr(dashboard, "clock_time", lambda: "12:00:00")

    async def ask(pilot):
        pilot.app.open_dashboard(joined())
        await wait_until(pilot, lambda: on_screen(pilot.app, Dashboard), what="the dashboard")
        screen = pilot.app.screen
        screen.running = True  # as if its loop ran: the worker itself is not started here
        screen.post_message(Dashboard.Update(ev.PhaseEvent("training", "round 2: training")))
        await wait_until(pilot, lambda: screen.phase == "training", what="the phase")
        await pilot.press("q")
        await wait_until(pilot, lambda: on_screen(pilot.app, ConfirmQuit), what="the question")

    app = still(ClientApp(devices=DEVICES, autostart=False))
    assert snap_compare(app, terminal_size=(80, 24), run_before=ask)


def test_help_screen(snap_compare):
    async def ask(pilot):
        await wait_until(pilot, lambda: on_screen(pilot.app, SetupScreen), what="Setup")
        await pilot.press("tab")  # from the URL field (which would type "?") to the next
        await pilot.press("f1")
        await wait_until(pilot, lambda: on_screen(pilot.app, HelpScreen), what="the help")

    assert snap_compare(still(ClientApp(devices=DEVICES)), terminal_size=(120, 40),
                        run_before=ask)
