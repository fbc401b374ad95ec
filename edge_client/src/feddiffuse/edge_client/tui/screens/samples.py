"""The samples screen: draw a grid from the current model, show it, say where the PNG went."""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.images import grid_image

from ...errors import Cancelled
from ...sampling import SampleResult, sample_grid
from ...session import Joined
from ..widgets.image_view import ImageView


class SamplesScreen(Screen):
    CSS_PATH = "samples.tcss"
    BINDINGS = [("escape", "back", "Back"), ("g", "generate", "Generate")]

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

    def compose(self) -> ComposeResult:
        settings = self.app.settings  # type: ignore[attr-defined]
        yield Header()
        with Horizontal(id="sample-options"):
            yield Label("Images", classes="option-label")
            yield Input(str(settings.sample_count), type="integer", id="count")
            yield Label("DDIM steps", classes="option-label")
            yield Input(str(settings.sample_steps), type="integer", id="steps")
            yield Button("Generate", variant="primary", id="generate")
            yield Button("Back", id="back")
        yield ProgressBar(total=None, show_eta=True, id="sample-progress")
        yield Static("Generate a grid of images from your current model (the global model "
                     "plus your personal segments).", id="sample-status")
        with VerticalScroll(id="grid-box"):
            yield ImageView("No samples yet.", id="grid")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Samples"

    def on_unmount(self) -> None:
        self.stop_event.set()

    @on(Button.Pressed, "#generate")
    def action_generate(self) -> None:
        try:
            n = int(self.query_one("#count", Input).value)
            steps = int(self.query_one("#steps", Input).value)
            if not (1 <= n <= 1024 and 1 <= steps <= 1000):
                raise ValueError
        except ValueError:
            self._say("Give 1 to 1024 images and 1 to 1000 steps.", bad=True)
            return
        settings = self.app.settings  # type: ignore[attr-defined]
        updated = settings.model_copy(update={"sample_count": n, "sample_steps": steps})
        updated.save()
        self.app.settings = updated  # type: ignore[attr-defined]
        self.query_one("#generate", Button).disabled = True
        self.query_one("#sample-progress", ProgressBar).update(total=steps, progress=0)
        self._say(f"Sampling {n} images in {steps} DDIM steps...")
        self.generate(n, steps)

    @work(thread=True, exclusive=True, group="sample")
    def generate(self, n: int, steps: int) -> None:
        out = self.joined.store.samples_dir / f"grid-{time.strftime('%Y%m%d-%H%M%S')}.png"
        try:
            result = sample_grid(self.joined.store, n, steps, out, device=self.joined.device,
                                 on_step=lambda i, total: self.post_message(
                                     self.Progress(i, total)),
                                 stop=self.stop_event)
        except Cancelled:
            self.post_message(self.Done(None, "Sampling stopped."))
        except UserError as exc:
            self.post_message(self.Done(None, str(exc)))
        except FedDiffuseError as exc:
            self.post_message(self.Done(None, f"Sampling failed: {exc}."))
        else:
            sentence = f"{result.description}. Saved to {result.path}"
            if result.note:
                sentence += f". {result.note}"
            self.post_message(self.Done(result, sentence))

    def on_samples_screen_progress(self, message: Progress) -> None:
        self.query_one("#sample-progress", ProgressBar).update(total=message.total,
                                                               progress=message.step)

    def on_samples_screen_done(self, message: Done) -> None:
        self.query_one("#generate", Button).disabled = False
        self.result = message.result
        self._say(message.sentence, bad=message.result is None)
        if message.result is not None:
            self.query_one("#grid", ImageView).show(grid_image(message.result.images))

    def _say(self, sentence: str, bad: bool = False) -> None:
        status = self.query_one("#sample-status", Static)
        status.update(sentence)
        status.set_class(bad, "-bad")

    @on(Button.Pressed, "#back")
    def action_back(self) -> None:
        self.stop_event.set()
        self.app.pop_screen()
