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
        self.detail = ""

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="title")
        yield ProgressBar(total=None, show_eta=True, classes="bar")
        yield Label("", classes="detail")

    @property
    def bar(self) -> ProgressBar:
        return self.query_one(ProgressBar)

    @property
    def eta_shown(self) -> bool:
        return bool(self.bar.query_one("#eta").display)

    @property
    def in_progress(self) -> bool:
        """Started (some progress or a known total) and not complete."""
        bar = self.bar
        started = bar.total is not None or bar.progress > 0
        return started and (bar.total is None or bar.progress < bar.total)

    def _detail(self, detail: str) -> None:
        self.detail = detail
        self.query_one(".detail", Label).update(detail)

    def _show_eta(self, shown: bool) -> None:
        self.bar.query_one("#eta").display = shown

    def set_progress(self, done: float, total: float | None, detail: str = "") -> None:
        bar = self.bar
        self._show_eta(total is None or done < total)  # nothing left to estimate when done
        if total is not None and bar.total != total:
            bar.update(total=total)
        bar.update(progress=done)
        self._detail(detail)

    def reset(self, detail: str = "") -> None:
        self.bar.update(total=None, progress=0)
        self._show_eta(True)
        self._detail(detail)

    def complete(self, detail: str = "") -> None:
        bar = self.bar
        if bar.total is None:
            bar.update(total=1)
        bar.update(progress=bar.total or 1)
        self._show_eta(False)
        self._detail(detail)

    def stop(self, note: str) -> None:
        """The task stopped before its end: keep how far it got, drop the ETA, say why."""
        self._show_eta(False)
        self._detail(f"{self.detail} ({note})" if self.detail else note)
