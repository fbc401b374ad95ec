"""The `?` help screen: what the screen underneath is for, and the keys that work on it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Static

GENERAL = ("Keys: Tab and Shift+Tab move between fields and buttons, Enter presses the "
           "focused button (in a field it does the screen's main action), q quits where no "
           "text field has focus and Ctrl+Q quits everywhere; quitting while the client is "
           "working asks first, and the next start resumes from the last finished epoch.")


def key_lines(screen: Screen) -> list[str]:
    """`key  description` for each key the footer of `screen` shows, in its order."""
    seen: set[tuple[str, str]] = set()
    lines: list[str] = []
    for active in screen.active_bindings.values():
        binding = active.binding
        if not binding.show or not binding.description or not active.enabled:
            continue  # the footer's keys: the screen's, not every editing key of a field
        shown = binding.key_display or screen.app.get_key_display(binding)
        if (shown, binding.description) in seen:
            continue
        seen.add((shown, binding.description))
        lines.append(f"  {shown:<12} {binding.description}")
    return lines


class HelpScreen(ModalScreen[None]):
    """Opened with `?` (or F1); Escape, Enter, `?` or `q` closes it."""

    CSS_PATH = "help.tcss"
    BINDINGS = [
        Binding("escape,enter,question_mark,q,f1", "close", "Close"),
    ]

    def __init__(self, title: str, about: str, keys: list[str]) -> None:
        super().__init__()
        self.title_text = title
        self.about = about
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(f"Help: {self.title_text}", id="help-title")
            with VerticalScroll(id="help-body"):
                yield Static(self.about, id="help-about")
                yield Static("Keys on this screen:\n" + "\n".join(self.keys or ["  (none)"]),
                             id="help-keys")
                yield Static(GENERAL, id="help-general")
            yield Button("Close", id="help-close")

    def on_mount(self) -> None:
        self.query_one("#help-close", Button).focus()

    def on_button_pressed(self) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
