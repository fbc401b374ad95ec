"""The dashboard: the federation and round, progress of each task, the loss, an event log.

The participant loop runs in a thread worker and posts `Dashboard.Update` messages; the UI
only changes in their handlers. Cancel sets the loop's stop event: training stops at the next
step, and the epoch checkpoints on disk let Start resume from the last finished epoch.
"""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, RichLog, Sparkline, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError

from ... import events as ev
from ...backoff import Backoff
from ...errors import Cancelled, HubError
from ...participant import Participant, ParticipantOptions, RunOutcome
from ...session import Joined, make_hub_client
from ..widgets.task_progress import TaskProgress

MAX_LOSS_POINTS = 120


def clock_time() -> str:
    """The time shown before each log line (replaced in snapshot tests)."""
    return time.strftime("%H:%M:%S")


class Dashboard(Screen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        ("c", "cancel", "Cancel"),
        ("r", "start", "Start / resume"),
        ("s", "samples", "Samples"),
        ("e", "setup", "Setup"),
    ]

    class Update(Message):
        """One participant event, carried from the worker thread to the UI."""

        def __init__(self, event: ev.Event) -> None:
            super().__init__()
            self.event = event

    class Stopped(Message):
        """The participant loop ended: finished, cancelled, or failed with a sentence."""

        def __init__(self, how: str, sentence: str) -> None:
            super().__init__()
            self.how = how  # done | finished | cancelled | failed
            self.sentence = sentence

    def __init__(self, joined: Joined, *, once: bool = False,
                 backoff: Backoff | None = None, poll_s: float = 5.0,
                 autostart: bool = True) -> None:
        super().__init__()
        self.joined = joined
        self.once = once
        self.backoff = backoff or Backoff()
        self.poll_s = poll_s
        self.autostart = autostart
        self.stop_event = threading.Event()
        self.losses: list[float] = []
        self.running = False
        self.uploaded_segments: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="overview"):
            yield Static(f"Hub {self.joined.url}", id="federation")
            yield Static("Round: -", id="round")
            yield Static("Segments uploaded this round: none yet", id="segments")
            yield Static(f"Device: {self.joined.device_reason}", id="device")
            yield Static("Starting...", id="phase")
        with Vertical(id="progress"):
            yield TaskProgress("Download", id="download")
            yield TaskProgress("Training", id="train")
            yield TaskProgress("Upload", id="upload")
        with Horizontal(id="loss-row"):
            yield Label("Loss", id="loss-title")
            yield Sparkline([], id="loss")
            yield Label("-", id="loss-value")
        yield RichLog(id="events", wrap=True, markup=False, max_lines=1000)
        with Horizontal(id="buttons"):
            yield Button("Cancel", variant="error", id="cancel")
            yield Button("Start", variant="success", id="start", disabled=True)
            yield Button("Samples", id="samples")
            yield Button("Setup", id="setup")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Dashboard"
        self.log_line(f"Images: {self.joined.scan.path} ({self.joined.scan.summary()}).")
        if self.autostart:
            self.action_start()
        else:
            self._set_running(False)

    def on_unmount(self) -> None:
        self.stop_event.set()

    # -- running the participant --------------------------------------------------------------

    def action_start(self) -> None:
        if self.running:
            return
        self.stop_event = threading.Event()
        self._set_running(True)
        for task in ("download", "train", "upload"):
            self.query_one(f"#{task}", TaskProgress).reset()
        self.participate()

    def action_cancel(self) -> None:
        if not self.running:
            return
        self.stop_event.set()
        self.query_one("#phase", Static).update("Stopping at the next step...")
        self.query_one("#cancel", Button).disabled = True

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.query_one("#cancel", Button).disabled = not running
        start = self.query_one("#start", Button)
        start.disabled = running
        start.label = "Resume" if not running else "Start"

    @work(thread=True, exclusive=True, group="participant")
    def participate(self) -> None:
        joined = self.joined
        stop = self.stop_event

        def emit(event: ev.Event) -> None:
            self.post_message(self.Update(event))

        options = ParticipantOptions(data_dir=joined.data_dir, device=joined.device,
                                     once=self.once, backoff=self.backoff, poll_s=self.poll_s,
                                     poll_max_s=max(self.poll_s, self.backoff.maximum))
        try:
            # A dashboard left a moment ago may still be stopping its own loop: wait for it.
            with joined.store.lock(wait_s=15.0), make_hub_client(
                    joined.url, joined.token, self.app.http_factory,  # type: ignore
                    ca_cert=joined.ca_cert) as hub:
                outcome: RunOutcome = Participant(hub, joined.store, options, emit, stop).run()
        except Cancelled as exc:
            self.post_message(self.Stopped("cancelled", f"Stopped: {exc}."))
        except UserError as exc:
            self.post_message(self.Stopped("failed", str(exc)))
        except (HubError, FedDiffuseError) as exc:
            self.post_message(self.Stopped("failed", f"Stopped: {exc}."))
        except Exception as exc:  # the UI must survive anything the loop raises
            self.post_message(self.Stopped("failed", f"Unexpected error: {exc!r}."))
        else:
            if outcome.finished:
                self.post_message(self.Stopped("finished", "The federation is finished; open "
                                                           "Samples to see your final model."))
            else:
                rounds = ", ".join(map(str, outcome.rounds_done))
                self.post_message(self.Stopped("done", f"Done: round(s) {rounds}."))

    # -- showing what happens -----------------------------------------------------------------

    def log_line(self, text: str, level: str = "info") -> None:
        prefix = {"warning": "! ", "error": "x "}.get(level, "")
        self.query_one("#events", RichLog).write(f"{clock_time()} {prefix}{text}")

    def on_dashboard_update(self, message: Update) -> None:
        event = message.event
        match event:
            case ev.LogEvent(message=text, level=level):
                self.log_line(text, level)
            case ev.DeviceEvent(device=device, reason=reason):
                self.query_one("#device", Static).update(f"Device: {device} ({reason})")
                self.log_line(f"Training on {device}: {reason}.")
            case ev.PhaseEvent(phase=phase, detail=detail):
                self.query_one("#phase", Static).update(f"{phase.capitalize()}: {detail}")
                task = {"downloading": "download", "training": "train",
                        "uploading": "upload"}.get(phase)
                if task is not None:
                    self.query_one(f"#{task}", TaskProgress).reset()
            case ev.RoundEvent(manifest=m):
                self.query_one("#federation", Static).update(
                    f"Federation {m.federation} at {self.joined.url}: method {m.method}, "
                    f"preset {m.preset}, you are {m.client_id}")
                self.query_one("#round", Static).update(
                    f"Round {m.round} of {m.rounds} ({m.phase}); upload this round: "
                    f"{', '.join(m.upload_segments) or '-'}")
                if self.uploaded_segments and m.phase == "open":
                    self.uploaded_segments = ()
                    self.query_one("#segments", Static).update(
                        "Segments uploaded this round: none yet")
            case ev.ProgressEvent(task=task, done=done, total=total):
                self.query_one(f"#{task}", TaskProgress).set_progress(
                    done, total, _progress_detail(task, done, total))
            case ev.LossEvent(loss=loss):
                self.losses = (self.losses + [loss])[-MAX_LOSS_POINTS:]
                self.query_one("#loss", Sparkline).data = list(self.losses)
                self.query_one("#loss-value", Label).update(f"{loss:.4f}")
            case ev.EpochEvent():
                pass  # the participant also logs a line per epoch
            case ev.RetryEvent(what=what, attempt=attempt, delay=delay, error=error):
                self.log_line(f"{what} failed ({error}); retry {attempt} in {delay:.1f} s",
                              "warning")
            case ev.UploadedEvent(round=r, segments=segments):
                self.uploaded_segments = segments
                self.query_one("#segments", Static).update(
                    f"Segments uploaded this round ({r}): {', '.join(segments)}")
                self.query_one("#upload", TaskProgress).complete("accepted by the hub")

    def on_dashboard_stopped(self, message: Stopped) -> None:
        self._set_running(False)
        self.query_one("#phase", Static).update(message.sentence)
        level = "error" if message.how == "failed" else "info"
        self.log_line(message.sentence, level)

    # -- navigation ---------------------------------------------------------------------------

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#samples")
    def action_samples(self) -> None:
        self.app.open_samples(self.joined)  # type: ignore[attr-defined]

    @on(Button.Pressed, "#setup")
    def action_setup(self) -> None:
        self.stop_event.set()
        self.app.open_setup()  # type: ignore[attr-defined]


def _progress_detail(task: str, done: float, total: float | None) -> str:
    if task == "train":
        return f"step {int(done)}/{int(total)}" if total else f"step {int(done)}"
    mb = done / 1e6
    return f"{mb:.2f} / {total / 1e6:.2f} MB" if total else f"{mb:.2f} MB"
