"""A modal directory browser that says how many usable images the highlighted folder holds."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Label, Static

from ...errors import SetupError
from ...inputs import scan_image_folder


class FolderTree(DirectoryTree):
    """A directory tree without files and hidden folders: the user picks a folder."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if p.is_dir() and not p.name.startswith(".")]


class FolderPicker(ModalScreen[Path | None]):
    """Browse to the image folder; dismisses with the chosen path, or None."""

    CSS_PATH = "folder_picker.tcss"
    BINDINGS = [("escape", "cancel", "Cancel")]

    class Scanned(Message):
        def __init__(self, path: Path, summary: str) -> None:
            super().__init__()
            self.path = path
            self.summary = summary

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start
        self.highlighted: Path = start

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label("Choose the folder that holds your images", id="picker-title")
            yield FolderTree(self.start, id="tree")
            yield Static("", id="picker-scan")
            with Horizontal(id="picker-buttons"):
                yield Button("Use this folder", variant="primary", id="choose")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(FolderTree).focus()
        self._scan(self.start)

    @on(DirectoryTree.NodeHighlighted)
    def _highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is not None:
            self.highlighted = Path(entry.path)
            self.query_one("#picker-scan", Static).update(f"{self.highlighted}: counting...")
            self._scan(self.highlighted)

    @on(DirectoryTree.DirectorySelected)
    def _selected(self, event: DirectoryTree.DirectorySelected) -> None:
        self.highlighted = Path(event.path)

    @work(thread=True, exclusive=True, group="scan")
    def _scan(self, path: Path) -> None:
        try:
            summary = scan_image_folder(path).summary()
        except (SetupError, OSError) as exc:
            summary = str(exc)
        self.post_message(self.Scanned(path, summary))

    def on_folder_picker_scanned(self, message: Scanned) -> None:
        if message.path == self.highlighted:
            self.query_one("#picker-scan", Static).update(f"{message.path}: {message.summary}")

    @on(Button.Pressed, "#choose")
    def _choose(self) -> None:
        self.dismiss(self.highlighted)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
