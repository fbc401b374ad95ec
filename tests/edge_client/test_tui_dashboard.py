"""Issue 11, items 5, 7 and 8 in the terminal app: feedback that is never stale, a finished
federation shown as finished with its model (hub or no hub), buttons that stay at 80x24, a
grid that fits or scrolls and says which, and the gallery of past grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from edge_images import make_images
from edge_sync import on_screen, wait_until
from textual.widgets import OptionList, RichLog, Static

from feddiffuse.edge_client import events as ev
from feddiffuse.edge_client.inputs import scan_image_folder
from feddiffuse.edge_client.session import Joined
from feddiffuse.edge_client.settings import Settings
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.edge_client.tui.app import ClientApp
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard
from feddiffuse.edge_client.tui.screens.samples import SamplesScreen
from feddiffuse.edge_client.tui.widgets.image_view import ImageView
from feddiffuse.edge_client.tui.widgets.task_progress import TaskProgress
from feddiffuse.shared.images import save_grid
from feddiffuse.shared.protocol import Manifest, TrainingSettings

pytestmark = pytest.mark.anyio

DEVICES = [("CPU", "cpu")]
URL = "http://hub.test"


def joined_at(tmp_path: Path) -> Joined:
    images = make_images(tmp_path / "images", n=4)
    return Joined(URL, "t", images, "cpu", "cpu (as asked)", scan_image_folder(images),
                  HubFolder(URL), None)


def manifest(round_: int, version: str, phase: str = "open") -> Manifest:
    return Manifest(federation="fed", client_id="alice", phase=phase, round=round_, rounds=3,
                    method="full", preset="tiny", global_version=version,
                    download_segments=["encoder", "bottleneck", "decoder"],
                    upload_segments=["encoder", "bottleneck", "decoder"],
                    training=TrainingSettings(local_epochs=1, batch_size=8, lr=1e-3))


def log_lines(dash: Dashboard) -> list[str]:
    return list(dash.logged)


async def dashboard(pilot, tmp_path) -> Dashboard:
    pilot.app.open_dashboard(joined_at(tmp_path))
    await wait_until(pilot, lambda: on_screen(pilot.app, Dashboard), what="the dashboard")
    return pilot.app.screen


async def feed(pilot, dash: Dashboard, *events: ev.Event) -> None:
    """Post events and wait until all are handled (a marker line comes last)."""
    for event in (*events, ev.LogEvent("-- marker --")):
        dash.post_message(Dashboard.Update(event))
    await wait_until(pilot, lambda: any("-- marker --" in t for t in log_lines(dash)),
                     what="the events")
    dash.logged.clear()


async def test_a_new_round_clears_the_last_rounds_feedback_and_is_logged(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await dashboard(pilot, tmp_path)
        upload = dash.query_one("#upload", TaskProgress)
        await feed(pilot, dash, ev.RoundEvent(manifest(1, "a" * 64)),
                   ev.ProgressEvent("upload", 10, 10),
                   ev.UploadedEvent(1, ("encoder", "bottleneck", "decoder"), None))
        assert upload.bar.percentage == 1.0 and upload.detail == "accepted by the hub"
        assert str(dash.query_one("#segments", Static).render()) == (
            "Uploaded in round 1: encoder, bottleneck, decoder")

        dash.logged.clear()
        for event in (ev.RoundEvent(manifest(1, "a" * 64, "reported")),
                      ev.RoundEvent(manifest(2, "b" * 64))):
            dash.post_message(Dashboard.Update(event))
        await wait_until(pilot, lambda: any("closed" in t for t in log_lines(dash)),
                         what="the round's end")
        assert any(f"Round 1 closed, new global model {'b' * 12} for round 2" in t
                   for t in log_lines(dash))
        assert upload.bar.percentage is None and upload.detail == ""  # not last round's 100 %
        assert str(dash.query_one("#segments", Static).render()) == (
            "Uploaded in round 2: nothing yet")


async def test_after_cancel_or_a_refused_upload_no_eta_is_left_running(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await dashboard(pilot, tmp_path)
        train = dash.query_one("#train", TaskProgress)
        upload = dash.query_one("#upload", TaskProgress)
        await feed(pilot, dash, ev.ProgressEvent("train", 3, 10),
                   ev.ProgressEvent("upload", 4, 10))
        assert train.eta_shown and upload.eta_shown
        dash.post_message(Dashboard.Stopped("failed", "The hub at http://hub.test rejected "
                                                      "the token (403)."))
        await wait_until(pilot, lambda: not upload.eta_shown, what="the stop")
        assert not train.eta_shown and "stopped" not in upload.detail
        assert upload.detail.endswith("(not accepted)")
        assert train.bar.progress == 3  # how far it got stays


async def test_retries_take_one_short_line_each(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=(80, 24)) as pilot:
        dash = await dashboard(pilot, tmp_path)
        error = f"cannot connect to the hub at {URL} (connection refused)"
        for attempt in (1, 2):
            dash.post_message(Dashboard.Update(ev.RetryEvent(
                "fetching the round manifest", attempt, 1.5 * attempt, error)))
        log = dash.query_one("#events", RichLog)
        await wait_until(pilot, lambda: any("retry 2" in t for t in log_lines(dash)))
        retries = [t for t in log_lines(dash) if "retry" in t]
        assert len(retries) == 2
        # Each fits on one line of the log at 80 columns, so it does not wrap onto two.
        assert all(len(t) <= log.scrollable_content_region.width for t in retries), retries
        assert URL not in retries[0]  # the dashboard shows the hub already


async def test_the_end_of_the_federation_is_said_once_with_its_model(tmp_path):
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await dashboard(pilot, tmp_path)
        dash.joined.store.update_info(federation="fed", rounds=3, global_version="f" * 64,
                                      finished=True)
        for event in (ev.PhaseEvent("finished", "the federation fed finished"),
                      ev.LogEvent("The federation is finished: sample from the final model "
                                  "with `feddiffuse-client sample`.")):
            dash.post_message(Dashboard.Update(event))
        dash.post_message(Dashboard.Stopped("finished", "The federation is finished."))
        dash.post_message(Dashboard.Update(ev.LogEvent("-- marker --")))
        await wait_until(pilot, lambda: any("-- marker --" in t for t in log_lines(dash)))
        assert sum("finished" in line for line in log_lines(dash)) == 1, log_lines(dash)
        phase = str(dash.query_one("#phase", Static).render())
        assert phase.startswith("The federation fed is finished after 3 rounds: its final "
                                f"model {'f' * 12} is on this computer")


async def test_a_finished_federation_is_shown_finished_without_asking_the_hub(tmp_path):
    joined = joined_at(tmp_path)
    joined.store.update_info(federation="fed", rounds=3, global_version="e" * 64,
                             global_round=3, finished=True)
    # autostart, and no hub at all: a loop would retry "fetching the round manifest" forever.
    app = ClientApp(devices=DEVICES, autostart=True)
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_dashboard(joined)
        await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
        dash = app.screen
        assert not dash.running and not dash.workers  # no loop was started
        assert "is finished after 3 rounds" in str(dash.query_one("#phase", Static).render())
        assert str(dash.query_one("#round", Static).render()) == "Round 3 of 3 (finished)"
        assert str(dash.query_one("#start").label) == "Ask hub"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_buttons_stay_on_screen(tmp_path, size):
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=size) as pilot:
        dash = await dashboard(pilot, tmp_path)
        await feed(pilot, dash, ev.RoundEvent(manifest(1, "a" * 64)),
                   *(ev.LogEvent(f"line {i}") for i in range(30)))
        footer_top = size[1] - 1
        for button in ("#cancel", "#start", "#samples", "#setup"):
            region = dash.query_one(button).region
            assert region.height > 0 and region.bottom <= footer_top, (button, region)
        assert dash.query_one("#events", RichLog).size.height >= 3


# -- the samples screen ------------------------------------------------------------------------


def write_grid(store: HubFolder, name: str, rounds_done: int | None) -> Path:
    store.samples_dir.mkdir(parents=True, exist_ok=True)
    path = save_grid(torch.zeros(4, 1, 28, 28), store.samples_dir / f"{name}.png")
    if rounds_done is not None:
        path.with_suffix(".json").write_text(json.dumps({
            "description": f"4 samples from the global model {'c' * 12}", "model": "c" * 64,
            "rounds_done": rounds_done, "rounds": 3, "images": 4, "steps": 10}))
    return path


async def test_gallery_lists_past_grids_newest_first_with_round_and_model(tmp_path):
    joined = joined_at(tmp_path)
    write_grid(joined.store, "grid-20260101-100000", 1)
    newest = write_grid(joined.store, "grid-20260301-100000", 3)
    write_grid(joined.store, "grid-20260201-100000", None)  # no note: an older client's
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=(120, 40)) as pilot:
        app.push_screen(SamplesScreen(joined))
        await wait_until(pilot, lambda: on_screen(app, SamplesScreen), what="Samples")
        screen = app.screen
        gallery = screen.query_one("#gallery", OptionList)
        titles = [str(gallery.get_option_at_index(i).prompt)
                  for i in range(gallery.option_count)]
        assert titles == [
            f"2026-03-01 10:00:00: 4 images, after round 3 of 3, model {'c' * 12}",
            "2026-02-01 10:00:00: model not recorded",
            f"2026-01-01 10:00:00: 4 images, after round 1 of 3, model {'c' * 12}",
        ]
        gallery.focus()
        gallery.highlighted = 0
        view = screen.query_one("#grid", ImageView)
        await wait_until(pilot, lambda: view.image is not None, what="the past grid")
        assert str(newest) in str(screen.query_one("#sample-status", Static).render())


async def test_the_grid_fits_or_scrolls_and_says_which(tmp_path):
    joined = joined_at(tmp_path)
    write_grid(joined.store, "grid-20260101-100000", 1)
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(SamplesScreen(joined))
        await wait_until(pilot, lambda: on_screen(app, SamplesScreen), what="Samples")
        screen = app.screen
        screen.query_one("#gallery", OptionList).highlighted = 0
        view = screen.query_one("#grid", ImageView)
        label = screen.query_one("#grid-scale", Static)
        await wait_until(pilot, lambda: view.scale is not None, what="the grid")
        assert view.fit and "Scaled to fit" in str(label.render())
        box = screen.query_one("#grid-box")
        assert view.region.width <= box.region.width  # every column is visible
        assert view.region.height <= box.region.height

        await pilot.press("z")
        await wait_until(pilot, lambda: "Full size, scrolling" in str(label.render()),
                         what="full size")
        assert view.scale == 1.0 and not Settings.load().grid_fit  # remembered


async def test_after_a_restart_the_event_log_shows_the_earlier_runs(tmp_path):
    joined = joined_at(tmp_path)
    joined.store.ensure()
    earlier = [f"2026-12-01 10:00:{i:02d} Round 1: epoch {i}/20 loss 0.5" for i in range(20)]
    joined.store.log_path.write_text("\n".join(earlier) + "\n", encoding="utf-8")
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await dashboard(pilot, tmp_path)
        shown = log_lines(dash)
        assert shown[:Dashboard.EARLIER_LINES] == [f"  {line}" for line in
                                                   earlier[-Dashboard.EARLIER_LINES:]]
        assert shown[Dashboard.EARLIER_LINES].startswith(tuple("0123456789"))  # then this run
        assert "Images:" in shown[Dashboard.EARLIER_LINES]
