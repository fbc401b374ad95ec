"""Input fields that leave the screen's letter keys alone where they cannot be typed.

A `TextField` takes every printable key, so single-letter shortcuts (`q`, `?`) do not apply
while it has focus; its hidden bindings keep them out of the footer there. A `NumberField`
takes digits only: any other printable key goes on to the screen, so `g` on the Samples
screen generates instead of being swallowed by the Images field.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.widgets import Input

NUMBER_CHARACTERS = frozenset("0123456789")


class TextField(Input):
    """A free-text field: letters are typed, so `q` and `?` are not shortcuts here."""

    BINDINGS = [
        # The first two never run (the field takes printable keys first); they hide the app's
        # `q Quit` and `? Help` from the footer while typing, which then shows `^q Quit` (the
        # app's own Ctrl+Q binding, a priority one, is what runs) and `f1 Help`.
        Binding("q", "app.bell", show=False),
        Binding("question_mark", "app.bell", show=False),
        Binding("ctrl+q", "app.quit", "Quit"),
    ]


class NumberField(Input):
    """A whole-number field: digits are typed, other printable keys are the screen's."""

    def __init__(self, value: str = "", **kwargs) -> None:
        super().__init__(value, type="integer", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character not in NUMBER_CHARACTERS:
            event.prevent_default()  # not Input's handler: the key bubbles to the bindings
            return
