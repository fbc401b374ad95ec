"""A modal folder browser that says how many usable images the highlighted folder holds.

It can go anywhere: ".." (or Backspace, or Left at the top level) goes up a folder, `~` goes
home, and a path typed in the field at the top (then Enter) opens that folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static

from ...errors import SetupError
from ...inputs import scan_image_folder
from ..widgets.fields import TextField

PARENT = ".."


class FolderTree(DirectoryTree):
    """A directory tree of folders only, without hidden ones, and a ".." entry on top."""

    BINDINGS = [
        Binding("backspace", "go_up", "Up a folder"),
        Binding("left", "left", "Up", show=False),
        Binding("right", "expand", "Open", show=False),
        Binding("tilde", "go_home", "Home folder"),
    ]

    class Rooted(Message):
        """The tree now shows `path` (after going up, home, or to a typed path)."""

        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = path

    @property
    def root_path(self) -> Path:
        return Path(self.path).expanduser().resolve()

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if p.name == PARENT
                or (self._safe_is_dir(p) and not p.name.startswith("."))]

    def _directory_content(self, location: Path, worker) -> Iterator[Path]:
        # The top folder lists its parent first, as "..", unless it is the file system root.
        if location == self.root_path and location.parent != location:
            yield location / PARENT
        yield from super()._directory_content(location, worker)

    def show_folder(self, path: Path) -> None:
        self.path = path
        self.post_message(self.Rooted(path))

    def action_go_up(self) -> None:
        root = self.root_path
        if root.parent != root:
            self.show_folder(root.parent)

    def action_go_home(self) -> None:
        self.show_folder(Path.home())

    def action_left(self) -> None:
        node = self.cursor_node
        if node is None or node is self.root:
            self.action_go_up()
        elif node.is_expanded:
            node.collapse()
        elif node.parent is not None and node.parent is not self.root:
            self.move_cursor(node.parent)
        else:
            self.action_go_up()

    def action_expand(self) -> None:
        node = self.cursor_node
        if node is not None and node.data is not None and node.data.path.name == PARENT:
            self.action_go_up()
        elif node is not None and node.allow_expand and not node.is_expanded:
            node.expand()


class FolderPicker(ModalScreen[Path | None]):
    """Browse to the image folder; dismisses with the chosen path, or None."""

    CSS_PATH = "folder_picker.tcss"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+o", "choose", "Use this folder"),  # not Ctrl+U: a field clears with it
        Binding("ctrl+l", "type_path", "Type a path"),
    ]
    HELP = ("Move with the arrows; Enter or Right opens a folder, '..' (or Backspace, or Left "
            "at the top) goes up, ~ goes to your home folder. Type a path in the field at the "
            "top and press Enter to go there. Use this folder (Ctrl+U) takes the highlighted "
            "folder.")

    class Scanned(Message):
        def __init__(self, path: Path, summary: str) -> None:
            super().__init__()
            self.path = path
            self.summary = summary

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start.expanduser().resolve()
        self.highlighted: Path = self.start

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label("Choose the folder that holds your images", id="picker-title")
            yield TextField(str(self.start), id="picker-path",
                            placeholder="type a folder's path and press Enter")
            yield FolderTree(self.start, id="tree")
            yield Static("", id="picker-scan")
            with Horizontal(id="picker-buttons"):
                yield Button("Use this folder", variant="primary", id="choose")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.sub_title = "Choose a folder"
        self.query_one(FolderTree).focus()
        self._scan(self.start)

    @property
    def folder_tree(self) -> FolderTree:
        return self.query_one(FolderTree)

    def _say(self, sentence: str, bad: bool = False) -> None:
        scan = self.query_one("#picker-scan", Static)
        scan.update(sentence)
        scan.set_class(bad, "-bad")

    def _look_at(self, path: Path) -> None:
        self.highlighted = path
        self._say(f"{path}: counting...")
        self._scan(path)

    @on(DirectoryTree.NodeHighlighted)
    def _highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is None:
            return
        path = Path(entry.path)
        if path.name == PARENT:
            self._say(f"Enter goes up to {path.resolve()}.")
            return
        self._look_at(path)

    @on(DirectoryTree.DirectorySelected)
    def _selected(self, event: DirectoryTree.DirectorySelected) -> None:
        if Path(event.path).name == PARENT:
            self.folder_tree.action_go_up()
        else:
            self.highlighted = Path(event.path)

    @on(FolderTree.Rooted)
    def _rooted(self, event: FolderTree.Rooted) -> None:
        path = Path(event.path).expanduser().resolve()
        self.query_one("#picker-path", Input).value = str(path)
        self._look_at(path)

    @on(Input.Submitted, "#picker-path")
    def _path_typed(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        path = Path(text).expanduser() if text else Path.home()
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is a file, not a folder"
            self._say(f"{path} {what}; type the path of a folder.", bad=True)
            return
        self.folder_tree.show_folder(path.resolve())
        self.folder_tree.focus()

    @work(thread=True, exclusive=True, group="scan")
    def _scan(self, path: Path) -> None:
        try:
            summary = scan_image_folder(path).summary()
        except (SetupError, OSError) as exc:
            summary = str(exc)
        self.post_message(self.Scanned(path, summary))

    def on_folder_picker_scanned(self, message: Scanned) -> None:
        if message.path == self.highlighted:
            self._say(f"{message.path}: {message.summary}")

    def action_type_path(self) -> None:
        self.query_one("#picker-path", Input).focus()

    @on(Button.Pressed, "#choose")
    def action_choose(self) -> None:
        self.dismiss(self.highlighted)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
