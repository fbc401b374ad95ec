"""Input fields, and which of the screen's letter keys they leave alone.

Textual drops the bindings of printable keys while a field that may take them has focus
(`check_consume_key`), so `q` and `?` are typed into a `TextField`, whose footer then shows
`^q Quit` (Ctrl+Q works everywhere) and `f1 Help`. A `NumberField` takes digits only: any other
printable key goes on to the screen, so `g` on the Samples screen generates instead of being
swallowed by the Images field.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.widgets import Input

NUMBER_CHARACTERS = frozenset("0123456789")


class TextField(Input):
    """A free-text field: letters are typed, so `q` and `?` are not shortcuts here."""

    BINDINGS = [
        # For the footer (a priority binding, so the app's hidden one does not replace it in
        # the footer's map); the app's own Ctrl+Q binding, checked first, is the one that runs.
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]


class NumberField(Input):
    """A whole-number field: digits are typed, other printable keys are the screen's."""

    def __init__(self, value: str = "", **kwargs) -> None:
        super().__init__(value, type="integer", **kwargs)

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return character is not None and character in NUMBER_CHARACTERS

    async def _on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character not in NUMBER_CHARACTERS:
            event.prevent_default()  # not Input's handler: the key goes on to the bindings
