"""An image drawn with half blocks: each terminal cell shows two pixels, one above the other.

Works in every terminal with true colour, needs no graphics protocol, and renders the same in
snapshot tests. It either fits the image into the space it has (keeping its aspect ratio, so
the whole image is always visible), or draws it at full size (one image pixel per column and
half row) for a scrolling container around it.
"""

from __future__ import annotations

from PIL import Image
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

UPPER_HALF = "\u2580"


def fitted_size(image_size: tuple[int, int], width: int, height: int | None
                ) -> tuple[int, int]:
    """(columns, pixel rows) that fit `width` columns and `height` text rows."""
    w, h = image_size
    scale = width / w
    if height is not None:
        scale = min(scale, 2 * height / h)
    if scale >= 1:
        scale = float(int(scale))  # whole factors keep pixels square and crisp
    cols = max(1, int(w * scale))
    rows = max(2, int(h * scale))
    return cols, rows + rows % 2


class HalfBlockImage:
    """A Rich renderable of a PIL image at `cols` x `rows` pixels (rows even)."""

    def __init__(self, image: Image.Image, cols: int, rows: int) -> None:
        self.image = image.convert("RGB")
        self.cols = cols
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cols, rows = self.cols, self.rows
        resample = Image.Resampling.NEAREST if cols >= self.image.width else Image.Resampling.BOX
        pixels = self.image.resize((cols, rows), resample).load()
        assert pixels is not None  # a resized image always has its pixels loaded
        for y in range(0, rows, 2):
            for x in range(cols):
                top = pixels[x, y]
                bottom = pixels[x, y + 1]
                yield Segment(UPPER_HALF, Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}"))
            yield Segment.line()


class ImageView(Widget):
    """Shows a PIL image (or a hint when there is none yet), fitted or at full size."""

    DEFAULT_CSS = """
    ImageView { width: 1fr; height: 1fr; min-height: 3; }
    ImageView.-full-size { width: auto; height: auto; }
    """

    fit: reactive[bool] = reactive(True, layout=True)

    class Scaled(Message):
        """The image is now drawn at `scale` times its size (1.0: one pixel per half cell)."""

        def __init__(self, view: ImageView, scale: float | None) -> None:
            super().__init__()
            self.view = view
            self.scale = scale

        @property
        def control(self) -> ImageView:
            return self.view

    def __init__(self, hint: str = "No image yet.", **kwargs) -> None:
        super().__init__(**kwargs)
        self.hint = hint
        self.image: Image.Image | None = None
        self.scale: float | None = None

    def show(self, image: Image.Image | None, hint: str | None = None) -> None:
        self.image = image
        if hint is not None:
            self.hint = hint
        self.refresh(layout=True)
        self.call_after_refresh(self._report_scale)

    def watch_fit(self, fit: bool) -> None:
        self.set_class(not fit, "-full-size")
        self.call_after_refresh(self._report_scale)

    def on_resize(self) -> None:
        self._report_scale()

    def _pixels(self) -> tuple[int, int] | None:
        if self.image is None:
            return None
        if not self.fit:
            w, h = self.image.size
            return w, h + h % 2
        size = self.content_size
        return fitted_size(self.image.size, max(1, size.width), max(1, size.height))

    def _report_scale(self) -> None:
        pixels = self._pixels()
        scale = pixels[0] / self.image.width if pixels and self.image is not None else None
        if scale != self.scale:
            self.scale = scale
            self.post_message(self.Scaled(self, scale))

    def get_content_width(self, container: Size, viewport: Size) -> int:
        if self.image is not None and not self.fit:
            return self.image.width
        return container.width

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if self.image is not None and not self.fit:
            return (self.image.height + 1) // 2
        return container.height

    def render(self):
        pixels = self._pixels()
        if pixels is None or self.image is None:
            return self.hint
        return HalfBlockImage(self.image, *pixels)
