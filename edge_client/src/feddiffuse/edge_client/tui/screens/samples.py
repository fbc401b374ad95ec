"""The samples screen: draw a grid from the current model, show it, and browse past grids.

The grid fits the space it has (so every image is visible), or with `z` is drawn at full size
in a box that scrolls; a line above it says which. The gallery on the left lists this
client's earlier grids, newest first, with the round and model each came from.
"""

from __future__ import annotations

import threading

from PIL import Image, UnidentifiedImageError
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.images import grid_image

from ...errors import Cancelled
from ...sampling import SampleResult, rounds_completed, sample_grid
from ...session import Joined
from ...state import new_png_path
from ..grids import GridNote, PastGrid, past_grids, write_note
from ..widgets.fields import NumberField
from ..widgets.image_view import ImageView


def model_version(joined: Joined) -> str | None:
    """The version of the model a grid drawn now comes from."""
    info = joined.store.load_info()
    return info.sample_version or info.global_version


class SamplesScreen(Screen):
    CSS_PATH = "samples.tcss"
    AUTO_FOCUS = "#count"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("g", "generate", "Generate"),
        Binding("z", "toggle_fit", "Fit / full size"),
        Binding("a", "audit", "Audit"),
    ]
    HELP = ("Draw a grid of images from your current model: the global model plus your own "
            "segments. Give the number of images and of DDIM steps, then press Enter or g. "
            "The grid is scaled to fit the window; z shows it at full size in a box that "
            "scrolls. Past grids of this client are listed on the left, newest first: move "
            "through them to see each one. a opens the memorisation audit: does the model "
            "reproduce your own images?")

    class Progress(Message):
        def __init__(self, step: int, total: int) -> None:
            super().__init__()
            self.step = step
            self.total = total

    class Done(Message):
        def __init__(self, result: SampleResult | None, sentence: str) -> None:
            super().__init__()
            self.result = result
            self.sentence = sentence

    def __init__(self, joined: Joined) -> None:
        super().__init__()
        self.joined = joined
        self.stop_event = threading.Event()
        self.result: SampleResult | None = None
        self.sampling = False
        self.grids: list[PastGrid] = []

    def compose(self) -> ComposeResult:
        settings = self.app.settings  # type: ignore[attr-defined]
        yield Header()
        with Horizontal(id="sample-options"):
            yield Label("Images", classes="option-label")
            yield NumberField(str(settings.sample_count), id="count")
            yield Label("DDIM steps", classes="option-label")
            yield NumberField(str(settings.sample_steps), id="steps")
            yield Button("Generate", variant="primary", id="generate")
            yield Button("Back", id="back")
        yield ProgressBar(total=None, show_eta=True, id="sample-progress")
        yield Static("Generate a grid of images from your current model (the global model "
                     "plus your personal segments).", id="sample-status")
        with Horizontal(id="sample-main"):
            with Vertical(id="gallery-pane"):
                yield Label("Past grids, newest first", id="gallery-title")
                yield OptionList(id="gallery")
            with Vertical(id="grid-pane"):
                yield Static("", id="grid-scale")
                with ScrollableContainer(id="grid-box"):
                    yield ImageView("No samples yet: press g to draw some.", id="grid")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Samples"
        self.query_one("#sample-progress", ProgressBar).display = False  # until sampling
        self.query_one("#grid", ImageView).fit = self.app.settings.grid_fit  # type: ignore
        self._list_grids()
        if self.grids:
            self.query_one("#grid", ImageView).hint = "Choose a past grid, or press g."

    def on_unmount(self) -> None:
        self.stop_event.set()

    def work_in_progress(self) -> str | None:
        if self.sampling:
            return "Sampling is running: it stops now, and this grid is not saved."
        return None

    # -- the gallery --------------------------------------------------------------------------

    def _list_grids(self, highlight: int | None = None) -> None:
        self.grids = past_grids(self.joined.store.samples_dir)
        gallery = self.query_one("#gallery", OptionList)
        gallery.clear_options()
        gallery.add_options([Option(g.title(), id=str(i)) for i, g in enumerate(self.grids)])
        if not self.grids:
            gallery.add_option(Option("No grids yet.", disabled=True))
        elif highlight is not None:
            gallery.highlighted = highlight

    @on(OptionList.OptionHighlighted, "#gallery")
    def _grid_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id is None or self.sampling:
            return
        grid = self.grids[int(event.option.id)]
        if self.result is not None and self.result.path == grid.path:
            return  # the grid just drawn is already on screen
        try:
            with Image.open(grid.path) as png:
                image = png.convert("RGB")
        except (OSError, UnidentifiedImageError):
            self._say(f"{grid.path} cannot be read as an image; it was left out.", bad=True)
            return
        self.result = None
        what = grid.note.description if grid.note else "model not recorded"
        self._say(f"Grid of {grid.made:%Y-%m-%d %H:%M:%S} ({what}): {grid.path}")
        self.query_one("#grid", ImageView).show(image)

    # -- fit or full size ---------------------------------------------------------------------

    def action_toggle_fit(self) -> None:
        view = self.query_one("#grid", ImageView)
        view.fit = not view.fit
        settings = self.app.settings.model_copy(update={"grid_fit": view.fit})  # type: ignore
        settings.save()
        self.app.settings = settings  # type: ignore[attr-defined]

    @on(ImageView.Scaled, "#grid")
    def _scaled(self, event: ImageView.Scaled) -> None:
        label = self.query_one("#grid-scale", Static)
        if event.scale is None:
            label.update("")
        elif event.view.fit:
            label.update(f"Scaled to fit: {event.scale:.0%} of full size (z: full size).")
        else:
            label.update("Full size, scrolling (z: fit the window).")

    # -- generating ---------------------------------------------------------------------------

    @on(NumberField.Submitted)
    @on(Button.Pressed, "#generate")
    def action_generate(self) -> None:
        if self.sampling:
            return
        try:
            n = int(self.query_one("#count", NumberField).value)
            steps = int(self.query_one("#steps", NumberField).value)
            if not (1 <= n <= 1024 and 1 <= steps <= 1000):
                raise ValueError
        except ValueError:
            self._say("Give 1 to 1024 images and 1 to 1000 steps.", bad=True)
            return
        settings = self.app.settings  # type: ignore[attr-defined]
        updated = settings.model_copy(update={"sample_count": n, "sample_steps": steps})
        updated.save()
        self.app.settings = updated  # type: ignore[attr-defined]
        self.sampling = True
        self.query_one("#generate", Button).disabled = True
        progress = self.query_one("#sample-progress", ProgressBar)
        progress.display = True
        progress.update(total=steps, progress=0)
        self._say(f"Sampling {n} images in {steps} DDIM steps...")
        self.generate(n, steps)

    @work(thread=True, exclusive=True, group="sample")
    def generate(self, n: int, steps: int) -> None:
        store = self.joined.store
        out = new_png_path(store.samples_dir, "grid")
        try:
            result = sample_grid(store, n, steps, out, device=self.joined.device,
                                 on_step=lambda i, total: self.post_message(
                                     self.Progress(i, total)),
                                 stop=self.stop_event)
        except Cancelled:
            self.post_message(self.Done(None, "Sampling stopped."))
            return
        except UserError as exc:
            self.post_message(self.Done(None, str(exc)))
            return
        except FedDiffuseError as exc:
            self.post_message(self.Done(None, f"Sampling failed: {exc}."))
            return
        info = store.load_info()
        try:
            write_note(result.path, GridNote(result.description, model_version(self.joined),
                                             rounds_completed(info), info.rounds, n, steps))
        except OSError:
            pass  # the grid is saved; the gallery then lists it as of an unrecorded model
        sentence = f"{result.description}. Saved to {result.path}"
        if result.note:
            sentence += f". {result.note}"
        self.post_message(self.Done(result, sentence))

    def on_samples_screen_progress(self, message: Progress) -> None:
        self.query_one("#sample-progress", ProgressBar).update(total=message.total,
                                                               progress=message.step)

    def on_samples_screen_done(self, message: Done) -> None:
        self.sampling = False
        self.query_one("#generate", Button).disabled = False
        self.query_one("#sample-progress", ProgressBar).display = False  # done: nothing runs
        self.result = message.result
        self._say(message.sentence, bad=message.result is None)
        if message.result is not None:
            self.query_one("#grid", ImageView).show(grid_image(message.result.images))
            self._list_grids(highlight=0)

    def _say(self, sentence: str, bad: bool = False) -> None:
        status = self.query_one("#sample-status", Static)
        status.update(sentence)
        status.set_class(bad, "-bad")

    def action_audit(self) -> None:
        self.app.open_audit(self.joined)  # type: ignore[attr-defined]

    @on(Button.Pressed, "#back")
    def action_back(self) -> None:
        self.stop_event.set()
        self.app.pop_screen()
