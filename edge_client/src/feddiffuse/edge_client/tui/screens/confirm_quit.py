"""Asked before quitting while the client is working: what stops, and that it resumes."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmQuit(ModalScreen[bool]):
    """Dismisses with True to quit. `y` (or `q` or Ctrl+Q again) quits, `n` or Escape stays."""

    CSS_PATH = "confirm_quit.tcss"
    BINDINGS = [
        Binding("y,q", "answer(True)", "Quit"),
        Binding("n,escape", "answer(False)", "Keep running"),
    ]

    def __init__(self, sentence: str) -> None:
        super().__init__()
        self.sentence = sentence

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static("Quit the FedDiffuse client?", id="confirm-title")
            yield Static(self.sentence, id="confirm-text")
            with Horizontal(id="confirm-buttons"):
                yield Button("Quit (y)", variant="error", id="confirm-quit")
                yield Button("Keep running (n)", variant="primary", id="confirm-stay")

    def on_mount(self) -> None:
        # The safe answer has focus: a stray Enter after `q` keeps the work going.
        self.query_one("#confirm-stay", Button).focus()

    @on(Button.Pressed, "#confirm-quit")
    def _quit(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-stay")
    def _stay(self) -> None:
        self.dismiss(False)

    def action_answer(self, quit_now: bool) -> None:
        self.dismiss(quit_now)
