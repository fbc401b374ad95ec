"""The audit screen: reached with `a` from Samples (and the dashboard), it runs the audit in a
worker and shows the copy rate, the threshold, the feature space and the pairs picture."""

from __future__ import annotations

import pytest
from edge_audit import URL, holding, write_pngs
from edge_sync import on_screen, wait_until
from support import memorising
from textual.widgets import Input, Static

from feddiffuse.edge_client.inputs import scan_image_folder
from feddiffuse.edge_client.session import Joined
from feddiffuse.edge_client.tui.app import ClientApp
from feddiffuse.edge_client.tui.screens.audit import AuditScreen
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard
from feddiffuse.edge_client.tui.screens.samples import SamplesScreen
from feddiffuse.edge_client.tui.widgets.image_view import ImageView
from feddiffuse.shared.model import build_unet

pytestmark = pytest.mark.anyio


def joined(store, folder) -> Joined:
    return Joined(URL, "t", folder, "cpu", "cpu (as asked)", scan_image_folder(folder), store,
                  None)


def text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


@pytest.fixture(scope="module")
def fmnist(fmnist_required_module):
    return memorising.fmnist_train_images()


async def test_a_on_samples_opens_the_audit_which_shows_its_result(tmp_path, fmnist):
    store = holding(build_unet("tiny", seed=0).state_dict())
    folder = write_pngs(tmp_path / "own", fmnist[:12])
    app = ClientApp(devices=[("CPU", "cpu")], autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        app.push_screen(SamplesScreen(joined(store, folder)))
        await wait_until(pilot, lambda: on_screen(app, SamplesScreen), what="Samples")
        await pilot.press("a")
        await wait_until(pilot, lambda: on_screen(app, AuditScreen), what="the audit screen")
        screen = app.screen
        assert "press g" in text(screen, "#audit-status")
        screen.query_one("#audit-count", Input).value = "4"
        screen.query_one("#audit-steps", Input).value = "2"
        await pilot.press("g")
        await wait_until(pilot, lambda: screen.audit is not None, what="the audit's result")
        summary = text(screen, "#audit-summary")
        assert "Pixel space: 0 of 4 samples (0%)" in summary and "not flagged" in summary
        assert "Feature space: penultimate 128-d features of the project's Fashion-MNIST" \
            in summary
        assert "No sign that the model reproduces" in text(screen, "#audit-status")
        assert screen.query_one("#audit-pairs", ImageView).image is not None
        assert screen.audit.pairs_path.is_file() and not screen.running
        await pilot.press("escape")
        await wait_until(pilot, lambda: on_screen(app, SamplesScreen), what="back to Samples")


async def open_audit_from_dashboard(app, pilot, store, folder):
    """The dashboard of a client holding `store`'s model, then its audit screen (key a)."""
    app.open_dashboard(joined(store, folder))
    await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
    app.screen.set_focus(None)
    await pilot.press("a")
    await wait_until(pilot, lambda: on_screen(app, AuditScreen), what="the audit screen")
    return app.screen


async def test_the_audit_screen_flags_a_memorised_model(tmp_path, fmnist):
    store = holding(memorising.load_weights())
    folder = write_pngs(tmp_path / "own", fmnist[:64])
    app = ClientApp(devices=[("CPU", "cpu")], autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_audit_from_dashboard(app, pilot, store, folder)
        screen.query_one("#audit-count", Input).value = "16"
        screen.query_one("#audit-steps", Input).value = "25"
        await pilot.press("g")
        await wait_until(pilot, lambda: screen.audit is not None, what="the audit's result")
        assert "FLAGGED" in text(screen, "#audit-summary")
        assert "reproduces some of your images" in text(screen, "#audit-status")
        assert screen.query_one("#audit-status", Static).has_class("-bad")


async def test_a_on_the_dashboard_opens_the_audit_and_a_missing_model_is_one_sentence(
        tmp_path, fmnist):
    store = holding(None)
    folder = write_pngs(tmp_path / "own", fmnist[:12])
    app = ClientApp(devices=[("CPU", "cpu")], autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_audit_from_dashboard(app, pilot, store, folder)
        await pilot.press("g")
        await wait_until(pilot, lambda: not screen.running and "no model" in text(
            screen, "#audit-status"), what="the missing model's sentence")
        assert screen.query_one("#audit-status", Static).has_class("-bad")
        assert screen.audit is None
