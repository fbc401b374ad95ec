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
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, RichLog, Sparkline, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.privacy import PrivacyReport

from ... import events as ev
from ...backoff import Backoff
from ...errors import Cancelled, HubCallError
from ...participant import Participant, ParticipantOptions, RunOutcome
from ...session import Joined, make_hub_client
from ...state import HubInfo
from ..widgets.task_progress import TaskProgress

MAX_LOSS_POINTS = 120


def clock_time() -> str:
    """The time shown before each log line (replaced in snapshot tests)."""
    return time.strftime("%H:%M:%S")


def final_model_sentence(info: HubInfo) -> str:
    """What a finished federation left on this computer, in one sentence."""
    name = f"The federation {info.federation}" if info.federation else "The federation"
    after = f" after {info.rounds} rounds" if info.rounds else ""
    if info.sample_version:
        model = f"its final model (the EMA {info.sample_version[:12]})"
    elif info.global_version:
        model = f"its final model {info.global_version[:12]}"
    else:
        return (f"{name} is finished{after}, but no model of it was downloaded here; press r "
                "to ask the hub for it.")
    return f"{name} is finished{after}: {model} is on this computer; press s to draw samples."


def privacy_text(privacy: PrivacyReport | None) -> str:
    """The privacy spent, for the round line ("" for a federation without DP)."""
    if privacy is None:
        return ""
    budget = f" of {privacy.epsilon_budget:g}" if privacy.epsilon_budget is not None else ""
    return (f"; privacy spent: epsilon {privacy.epsilon:.3g}{budget} "
            f"({privacy.settings.mode} DP, delta {privacy.settings.delta:g})")


def short_error(error: str, url: str) -> str:
    """A retry's error in a few words: its reason in brackets when it has one, and never the
    hub's address, which the dashboard shows already (so a retry fits one line at 80 columns)."""
    error = error.replace(f" at {url}", "").replace(f" {url}", "")
    if error.endswith(")") and "(" in error:
        return error[error.rindex("(") + 1:-1]
    return error


class Dashboard(Screen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        Binding("c", "cancel", "Cancel"),
        Binding("r", "start", "Start / resume"),
        Binding("s", "samples", "Samples"),
        Binding("e", "setup", "Setup"),
        Binding("a", "audit", "Audit", show=False),  # also on the Samples screen's footer
    ]
    HELP = ("The dashboard shows the federation and its round, the progress of downloading, "
            "training and uploading, the training loss and what happened. Cancel stops at the "
            "next training step; Start (Resume) carries on from the last finished epoch. "
            "Samples draws images from your current model; Setup goes back to the hub and "
            "folder settings; a opens the memorisation audit (does the model reproduce your "
            "own images?).")

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
        self.phase = ""
        self.uploaded_segments: tuple[str, ...] = ()
        self.seen: tuple[int, str, str] | None = None  # (round, phase, version) last shown
        self.finished_shown = False
        self.logged: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="body"):
            with Vertical(id="overview"):
                yield Static(f"Hub {self.joined.url}", id="federation")
                yield Static("Round: -", id="round")
                yield Static("Uploaded: nothing yet", id="segments")
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
        # Outside the body, which shrinks first: the buttons stay visible at 80x24.
        with Horizontal(id="buttons"):
            yield Button("Cancel", variant="error", id="cancel")
            yield Button("Start", variant="success", id="start", disabled=True)
            yield Button("Samples", id="samples")
            yield Button("Setup", id="setup")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Dashboard"
        self._show_earlier_events()
        self.log_line(f"Images: {self.joined.scan.path} ({self.joined.scan.summary()}).")
        info = self.joined.store.load_info()
        self._show_known(info)
        if info.finished:
            # Known to be over: show it so, with its model, without asking a hub that may be
            # gone (it would be retried forever); Start asks the hub again.
            self._show_finished(info)
            self._set_running(False)
        elif self.autostart:
            self.action_start()
        else:
            self._set_running(False)

    def work_in_progress(self) -> str | None:
        """What quitting now would stop (for the quit confirmation), or None."""
        if not self.running or self.stop_event.is_set():
            return None
        if self.phase == "training":
            return ("Training is running: it stops now, and the next start resumes from the "
                    "last finished epoch.")
        return ("The client is taking part in the federation: it stops now, and the next "
                "start picks up where it left off.")

    def on_resize(self) -> None:
        # Below 32 rows the panels lose their borders, so the event log keeps a few lines.
        self.set_class(self.size.height < 32, "-compact")

    def _show_known(self, info: HubInfo) -> None:
        """What this computer knows of the federation, before (or without) the hub."""
        if info.federation:
            self.query_one("#federation", Static).update(
                f"Federation {info.federation} ({info.method}, preset {info.preset}) at "
                f"{self.joined.url}, as {info.client_id or '?'}")
        if info.finished and info.rounds:
            self.query_one("#round", Static).update(
                f"Round {info.rounds} of {info.rounds} (finished)")
        elif info.global_round and info.rounds:
            self.query_one("#round", Static).update(
                f"Round {info.global_round} of {info.rounds} (last seen here)")

    def _show_finished(self, info: HubInfo) -> None:
        sentence = final_model_sentence(info)
        self.query_one("#phase", Static).update(sentence)
        if not self.finished_shown:
            self.finished_shown = True
            self.log_line(sentence)

    def on_unmount(self) -> None:
        self.stop_event.set()

    # -- running the participant --------------------------------------------------------------

    def action_start(self) -> None:
        if self.running:
            return
        self.stop_event = threading.Event()
        self.finished_shown = False
        self._set_running(True)
        self._reset_bars()
        self.participate()

    def _reset_bars(self) -> None:
        for task in ("download", "train", "upload"):
            self.query_one(f"#{task}", TaskProgress).reset()

    def action_cancel(self) -> None:
        if not self.running:
            return
        self.stop_event.set()
        self.query_one("#phase", Static).update("Stopping at the next step...")
        self.query_one("#cancel", Button).disabled = True

    def _set_running(self, running: bool) -> None:
        self.running = running
        cancel = self.query_one("#cancel", Button)
        cancel.disabled = not running
        start = self.query_one("#start", Button)
        start.disabled = running
        if running:
            start.label = "Start"
        elif self.joined.store.load_info().finished:
            start.label = "Ask hub"
        else:
            start.label = "Resume"
        (cancel if running else start).focus()  # Enter acts on what can be done now

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
        except (HubCallError, FedDiffuseError) as exc:
            self.post_message(self.Stopped("failed", f"Stopped: {exc}."))
        except Exception as exc:  # the UI must survive anything the loop raises
            self.post_message(self.Stopped("failed", f"Unexpected error: {exc!r}."))
        else:
            if outcome.finished:
                self.post_message(self.Stopped("finished", "The federation is finished."))
            else:
                rounds = ", ".join(map(str, outcome.rounds_done))
                self.post_message(self.Stopped("done", f"Done: round(s) {rounds}."))

    # -- showing what happens -----------------------------------------------------------------

    EARLIER_LINES = 12

    def _show_earlier_events(self) -> None:
        """The end of this hub's log file (earlier runs), so a restart does not open on an empty
        event log."""
        path = self.joined.store.log_path
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()[-self.EARLIER_LINES:]
        except OSError:
            return
        if not lines:
            return
        events = self.query_one("#events", RichLog)
        events.write(f"Earlier (from {path}):")
        for line in lines:
            events.write(f"  {line}")
            self.logged.append(f"  {line}")

    def log_line(self, text: str, level: str = "info") -> None:
        prefix = {"warning": "! ", "error": "x "}.get(level, "")
        line = f"{clock_time()} {prefix}{text}"
        self.logged.append(line)  # what was said, one entry per line however it wraps
        self.query_one("#events", RichLog).write(line)

    def on_dashboard_update(self, message: Update) -> None:
        event = message.event
        match event:
            case ev.LogEvent(message=text, level=level):
                if self.finished_shown and "finished" in text:
                    return  # the end of the federation is said once, with its model
                self.log_line(text, level)
            case ev.DeviceEvent(device=device, reason=reason):
                self.query_one("#device", Static).update(f"Device: {device} ({reason})")
                self.log_line(f"Training on {device}: {reason}.")
            case ev.PhaseEvent(phase="finished"):
                self.phase = "finished"
                self._show_finished(self.joined.store.load_info())
            case ev.PhaseEvent(phase=phase, detail=detail):
                self.phase = phase
                self.query_one("#phase", Static).update(f"{phase.capitalize()}: {detail}")
                task = {"downloading": "download", "training": "train",
                        "uploading": "upload"}.get(phase)
                if task is not None:
                    self.query_one(f"#{task}", TaskProgress).reset()
            case ev.RoundEvent(manifest=m):
                self._show_round(m)
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
                wait = f"{delay:.1f}" if delay < 10 else f"{delay:.0f}"
                self.log_line(f"{what}: {short_error(error, self.joined.url)}, retry {attempt} "
                              f"in {wait}s", "warning")
            case ev.UploadedEvent(round=r, segments=segments):
                self.uploaded_segments = segments
                self.query_one("#segments", Static).update(
                    f"Uploaded in round {r}: {', '.join(segments)}")
                self.query_one("#upload", TaskProgress).complete("accepted by the hub")

    def _show_round(self, m) -> None:
        self.query_one("#federation", Static).update(
            f"Federation {m.federation} ({m.method}, preset {m.preset}) at {self.joined.url}, "
            f"as {m.client_id}")
        uploads = ", ".join(m.upload_segments) or "nothing"
        self.query_one("#round", Static).update(
            f"Round {m.round} of {m.rounds} ({m.phase}); this round uploads {uploads}"
            + privacy_text(m.privacy))
        before, self.seen = self.seen, (m.round, str(m.phase), m.global_version)
        if before is None:
            self.log_line(f"Round {m.round} of {m.rounds} is {m.phase}.")
        elif m.round > before[0] or (m.round == before[0] and m.global_version != before[2]):
            self.log_line(f"Round {before[0]} closed, new global model {m.global_version[:12]}"
                          + (f" for round {m.round}." if m.phase != "finished" else "."))
        elif str(m.phase) == "finished" and before[1] != "finished":
            self.log_line(f"Round {m.round} closed, new global model "
                          f"{m.global_version[:12]}: the final one.")
        if (before is not None and str(m.phase) != "finished"
                and (m.round, m.global_version) != (before[0], before[2])):
            # A new round: what the bars showed belongs to the one before. (The end of the
            # federation is no new round: what this client uploaded last stays shown.)
            self._reset_bars()
            self.uploaded_segments = ()
            self.query_one("#segments", Static).update(
                f"Uploaded in round {m.round}: nothing yet")

    def on_dashboard_stopped(self, message: Stopped) -> None:
        self._set_running(False)
        note = {"cancelled": "stopped", "failed": "not finished"}.get(message.how)
        if note is not None:
            for task in ("download", "train", "upload"):
                bar = self.query_one(f"#{task}", TaskProgress)
                if bar.in_progress:
                    bar.stop("not accepted" if task == "upload" and message.how == "failed"
                             else note)
        if message.how == "finished":
            self._show_finished(self.joined.store.load_info())
            return
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

    def action_audit(self) -> None:
        self.app.open_audit(self.joined)  # type: ignore[attr-defined]

    @on(Button.Pressed, "#setup")
    def action_setup(self) -> None:
        self.stop_event.set()
        self.app.open_setup()  # type: ignore[attr-defined]


def _progress_detail(task: str, done: float, total: float | None) -> str:
    if task == "train":
        return f"step {int(done)}/{int(total)}" if total else f"step {int(done)}"
    mb = done / 1e6
    return f"{mb:.2f} / {total / 1e6:.2f} MB" if total else f"{mb:.2f} MB"
