"""The audit screen: does the model this client holds reproduce the owner's own images?

It samples the model (seeded), matches every sample with the nearest of the owner's images,
and shows the share of samples closer than the owner's images are to each other (the copy
rate), the threshold, the feature space used and the closest pairs. All of it on this
computer; see feddiffuse.edge_client.audit.
"""

from __future__ import annotations

import threading

from PIL import Image, UnidentifiedImageError
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, ProgressBar, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError

from ...audit import ClientAudit, feature_space_words, run_audit, space_line
from ...errors import Cancelled
from ...session import Joined
from ..widgets.fields import NumberField
from ..widgets.image_view import ImageView

STAGES = {"sampling": "Sampling", "features": "Computing features",
          "matching": "Finding nearest neighbours"}


class AuditScreen(Screen):
    CSS_PATH = "audit.tcss"
    AUTO_FOCUS = "#audit-count"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("g", "run_audit", "Run audit"),
    ]
    HELP = ("Check whether your current model reproduces your own images. The audit draws "
            "samples from the model, finds for each the nearest of your images, and counts the "
            "near-copies: samples closer to one of yours than your images are to each other, "
            "and distinctly closer to it than to your others (both thresholds are the 5th "
            "percentiles of your own images against each other). It runs on this computer "
            "only: nothing is sent to the hub. The picture shows the closest samples, each "
            "beside your image nearest to it; a red frame marks a near-copy.")

    class Progress(Message):
        def __init__(self, stage: str, done: int, total: int) -> None:
            super().__init__()
            self.stage = stage
            self.done = done
            self.total = total

    class Done(Message):
        def __init__(self, audit: ClientAudit | None, sentence: str) -> None:
            super().__init__()
            self.audit = audit
            self.sentence = sentence

    def __init__(self, joined: Joined) -> None:
        super().__init__()
        self.joined = joined
        self.stop_event = threading.Event()
        self.audit: ClientAudit | None = None
        self.running = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="audit-options"):
            yield Label("Samples", classes="option-label")
            yield NumberField("64", id="audit-count")
            yield Label("DDIM steps", classes="option-label")
            yield NumberField("50", id="audit-steps")
            yield Button("Run audit", variant="primary", id="audit-run")
            yield Button("Back", id="audit-back")
        yield ProgressBar(total=None, show_eta=False, id="audit-progress")
        yield Static(f"Check whether your model reproduces your own images in "
                     f"{self.joined.data_dir}: press g. Nothing leaves this computer.",
                     id="audit-status")
        yield Static("", id="audit-summary")
        with ScrollableContainer(id="audit-box"):
            yield ImageView("No audit yet: press g to run one.", id="audit-pairs")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Memorisation audit"
        self.query_one("#audit-progress", ProgressBar).display = False

    def on_unmount(self) -> None:
        self.stop_event.set()

    def work_in_progress(self) -> str | None:
        if self.running:
            return "The memorisation audit is running: it stops now, and nothing is saved."
        return None

    @on(NumberField.Submitted)
    @on(Button.Pressed, "#audit-run")
    def action_run_audit(self) -> None:
        if self.running:
            return
        try:
            n = int(self.query_one("#audit-count", NumberField).value)
            steps = int(self.query_one("#audit-steps", NumberField).value)
            if not (1 <= n <= 4096 and 1 <= steps <= 1000):
                raise ValueError
        except ValueError:
            self._say("Give 1 to 4096 samples and 1 to 1000 steps.", bad=True)
            return
        self.running = True
        self.query_one("#audit-run", Button).disabled = True
        progress = self.query_one("#audit-progress", ProgressBar)
        progress.display = True
        progress.update(total=steps, progress=0)
        self._say(f"Sampling {n} images in {steps} DDIM steps...")
        self.run_in_thread(n, steps)

    @work(thread=True, exclusive=True, group="audit")
    def run_in_thread(self, n: int, steps: int) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            self.post_message(self.Progress(stage, done, total))

        try:
            audit = run_audit(self.joined.store, self.joined.data_dir, n, steps=steps,
                              device=self.joined.device, stop=self.stop_event,
                              progress=progress)
        except Cancelled:
            self.post_message(self.Done(None, "The audit stopped."))
            return
        except UserError as exc:
            self.post_message(self.Done(None, str(exc)))
            return
        except (FedDiffuseError, OSError) as exc:
            self.post_message(self.Done(None, f"The audit failed: {exc}."))
            return
        self.post_message(self.Done(audit, audit.result.verdict()))

    def on_audit_screen_progress(self, message: Progress) -> None:
        progress = self.query_one("#audit-progress", ProgressBar)
        progress.update(total=message.total, progress=message.done)
        self._say(f"{STAGES.get(message.stage, message.stage)}...")

    def on_audit_screen_done(self, message: Done) -> None:
        self.running = False
        self.query_one("#audit-run", Button).disabled = False
        self.query_one("#audit-progress", ProgressBar).display = False
        self.audit = message.audit
        self._say(message.sentence, bad=message.audit is None or message.audit.result.flagged)
        if message.audit is None:
            return
        r = message.audit.result
        lines = [space_line(s, r.quantile) for s in r.spaces.values()]
        lines.append(f"Feature space: {feature_space_words(r)}.")
        lines.append(f"Model: {message.audit.model}. Pairs: {message.audit.pairs_path}")
        self.query_one("#audit-summary", Static).update("\n".join(lines))
        try:
            with Image.open(message.audit.pairs_path) as png:
                image = png.convert("RGB")
        except (OSError, UnidentifiedImageError):
            return
        self.query_one("#audit-pairs", ImageView).show(image)

    def _say(self, sentence: str, bad: bool = False) -> None:
        status = self.query_one("#audit-status", Static)
        status.update(sentence)
        status.set_class(bad, "-bad")

    @on(Button.Pressed, "#audit-back")
    def action_back(self) -> None:
        self.stop_event.set()
        self.app.pop_screen()
