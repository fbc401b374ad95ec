"""A labelled progress bar with ETA for one task of a round (download, training, upload)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class TaskProgress(Horizontal):
    """`title  [#####-----] 50%  ETA 0:12  detail`."""

    DEFAULT_CSS = """
    TaskProgress { height: 1; }
    TaskProgress > .title { width: 10; }
    TaskProgress > .detail { width: 1fr; padding-left: 1; color: $text-muted; }
    """

    def __init__(self, title: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="title")
        yield ProgressBar(total=None, show_eta=True, classes="bar")
        yield Label("", classes="detail")

    @property
    def bar(self) -> ProgressBar:
        return self.query_one(ProgressBar)

    def set_progress(self, done: float, total: float | None, detail: str = "") -> None:
        bar = self.bar
        if total is not None and bar.total != total:
            bar.update(total=total)
        bar.update(progress=done)
        self.query_one(".detail", Label).update(detail)

    def reset(self, detail: str = "") -> None:
        self.bar.update(total=None, progress=0)
        self.query_one(".detail", Label).update(detail)

    def complete(self, detail: str = "") -> None:
        bar = self.bar
        if bar.total is None:
            bar.update(total=1)
        bar.update(progress=bar.total)
        self.query_one(".detail", Label).update(detail)
