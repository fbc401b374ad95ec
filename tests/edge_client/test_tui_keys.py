"""Issue 11, item 6: focus and keys. A focused first field, Enter acts, `q` quits where no
text field has focus, `?` help, a question before quitting mid-training, and on the Samples
screen `g` and Enter generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from edge_images import make_images
from edge_sync import on_screen, wait_until
from textual.widgets import Input, Static

from feddiffuse.edge_client import events as ev
from feddiffuse.edge_client.inputs import scan_image_folder
from feddiffuse.edge_client.sampling import SampleResult
from feddiffuse.edge_client.session import Joined
from feddiffuse.edge_client.settings import Settings
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.edge_client.tui.app import ClientApp
from feddiffuse.edge_client.tui.screens import samples as samples_screen
from feddiffuse.edge_client.tui.screens.confirm_quit import ConfirmQuit
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard
from feddiffuse.edge_client.tui.screens.help import HelpScreen
from feddiffuse.edge_client.tui.screens.samples import SamplesScreen
from feddiffuse.edge_client.tui.screens.setup import SetupScreen
from feddiffuse.shared.images import save_grid

pytestmark = pytest.mark.anyio

DEVICES = [("CPU", "cpu")]
SIZE = (120, 40)
URL = "http://hub.test"


def joined_at(tmp_path: Path) -> Joined:
    images = make_images(tmp_path / "images", n=4)
    return Joined(URL, "t", images, "cpu", "cpu (as asked)", scan_image_folder(images),
                  HubFolder(URL), None)


class Exits:
    """Records the app's exit instead of ending the test's app."""

    def __init__(self, app: ClientApp) -> None:
        self.count = 0
        app.exit = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs) -> None:
        self.count += 1


async def setup_shown(pilot) -> SetupScreen:
    await wait_until(pilot, lambda: on_screen(pilot.app, SetupScreen), what="Setup")
    return pilot.app.screen


async def test_setup_takes_the_first_keystrokes_in_the_url_field():
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        await pilot.press(*"http://h")
        assert screen.query_one("#hub-url", Input).value == "http://h"


async def test_setup_focuses_the_first_empty_field():
    Settings(hub_url="http://hub.example.org:8000").save()
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        assert app.focused is screen.query_one("#token", Input)


async def test_q_and_question_mark_are_typed_in_text_fields_and_are_keys_elsewhere():
    app = ClientApp(devices=DEVICES)
    exits = Exits(app)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        await pilot.press("q", "question_mark")
        assert screen.query_one("#hub-url", Input).value == "q?"
        assert exits.count == 0 and not on_screen(app, HelpScreen)
        screen.query_one("#join").focus()
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: on_screen(app, HelpScreen), what="the help")
        assert "Test connection" in str(app.screen.query_one("#help-keys", Static).render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: on_screen(app, SetupScreen), what="Setup again")
        await pilot.press("q")  # nothing is running: quits at once
        assert exits.count == 1


async def test_f1_opens_help_from_a_text_field():
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        await setup_shown(pilot)
        await pilot.press("f1")
        await wait_until(pilot, lambda: on_screen(app, HelpScreen), what="the help")


async def running_dashboard(pilot, tmp_path, phase: str) -> Dashboard:
    pilot.app.open_dashboard(joined_at(tmp_path))
    await wait_until(pilot, lambda: on_screen(pilot.app, Dashboard), what="the dashboard")
    dash = pilot.app.screen
    dash.running = True  # as while its loop runs (not started: autostart=False)
    dash.post_message(Dashboard.Update(ev.PhaseEvent(phase, "round 1")))
    await wait_until(pilot, lambda: dash.phase == phase, what="the phase")
    return dash


async def test_quitting_mid_training_asks_and_says_the_next_start_resumes(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    exits = Exits(app)
    async with app.run_test(size=SIZE) as pilot:
        dash = await running_dashboard(pilot, tmp_path, "training")
        await pilot.press("q")
        await wait_until(pilot, lambda: on_screen(app, ConfirmQuit), what="the question")
        sentence = str(app.screen.query_one("#confirm-text", Static).render())
        assert "resumes from the last finished epoch" in sentence
        await pilot.press("enter")  # the focused answer is the safe one: keep running
        await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
        assert exits.count == 0 and not dash.stop_event.is_set()

        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: on_screen(app, ConfirmQuit), what="the question")
        await pilot.press("n")
        await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
        assert exits.count == 0

        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: on_screen(app, ConfirmQuit), what="the question")
        await pilot.press("y")
        await wait_until(pilot, lambda: exits.count == 1, what="the quit")
        assert dash.stop_event.is_set()  # the loop is told to stop before the app ends


async def test_ctrl_q_twice_quits_while_working(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    exits = Exits(app)
    async with app.run_test(size=SIZE) as pilot:
        await running_dashboard(pilot, tmp_path, "waiting")
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: on_screen(app, ConfirmQuit), what="the question")
        assert "picks up where it left off" in str(
            app.screen.query_one("#confirm-text", Static).render())
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: exits.count == 1, what="the quit")


async def test_dashboard_focuses_what_can_be_done_and_q_quits_when_idle(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    exits = Exits(app)
    async with app.run_test(size=SIZE) as pilot:
        app.open_dashboard(joined_at(tmp_path))
        await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
        assert app.focused is app.screen.query_one("#start")
        await pilot.press("q")
        assert exits.count == 1 and not on_screen(app, ConfirmQuit)


@pytest.fixture
def fake_sampling(monkeypatch):
    """sample_grid without a model: a grid of 4 noise images, written where it is asked."""
    calls: list[tuple[int, int]] = []

    def fake(store, n, steps, out, *, device="auto", on_step=None, stop=None):
        calls.append((n, steps))
        images = torch.zeros(n, 1, 28, 28).uniform_(-1, 1)
        for i in range(1, steps + 1):
            on_step(i, steps)
        return SampleResult(save_grid(images, out), images,
                            f"{n} samples from the global model abcdefabcdef, DDIM {steps} "
                            "steps")

    monkeypatch.setattr(samples_screen, "sample_grid", fake)
    return calls


async def open_samples(pilot, tmp_path) -> SamplesScreen:
    pilot.app.push_screen(SamplesScreen(joined_at(tmp_path)))
    await wait_until(pilot, lambda: on_screen(pilot.app, SamplesScreen), what="Samples")
    return pilot.app.screen


async def test_samples_g_generates_from_the_images_field(tmp_path, fake_sampling):
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_samples(pilot, tmp_path)
        count = screen.query_one("#count", Input)
        assert app.focused is count  # the first field has focus
        count.value = "4"
        await pilot.press("end", "x", "g")  # a letter is not typed; g is the screen's key
        await wait_until(pilot, lambda: screen.result is not None, what="the grid")
        assert count.value == "4" and fake_sampling == [(4, 50)]


async def test_samples_enter_generates(tmp_path, fake_sampling):
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_samples(pilot, tmp_path)
        steps = screen.query_one("#steps", Input)
        steps.focus()
        steps.value = "3"
        await pilot.press("end", "0", "enter")  # digits are typed, Enter generates
        await wait_until(pilot, lambda: screen.result is not None, what="the grid")
        assert fake_sampling == [(64, 30)]
        assert Settings.load().sample_steps == 30
