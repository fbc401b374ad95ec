"""An image drawn with half blocks: each terminal cell shows two pixels, one above the other.

Works in every terminal with true colour, needs no graphics protocol, and renders the same in
snapshot tests. The image is scaled to fit the widget, keeping its aspect ratio.
"""

from __future__ import annotations

from PIL import Image
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from textual.widgets import Static

UPPER_HALF = "\u2580"


class HalfBlockImage:
    """A Rich renderable of a PIL image, fitted into the space it is given."""

    def __init__(self, image: Image.Image, max_height: int | None = None) -> None:
        self.image = image.convert("RGB")
        self.max_height = max_height

    def fitted_size(self, width: int, height: int | None) -> tuple[int, int]:
        """(columns, pixel rows) that fit `width` columns and `height` text rows."""
        w, h = self.image.size
        scale = width / w
        if height is not None:
            scale = min(scale, 2 * height / h)
        if scale >= 1:
            scale = float(int(scale))  # whole factors keep pixels square and crisp
        cols = max(1, int(w * scale))
        rows = max(2, int(h * scale))
        return cols, rows + rows % 2

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or self.max_height
        cols, rows = self.fitted_size(options.max_width, height)
        resample = Image.Resampling.NEAREST if cols >= self.image.width else Image.Resampling.BOX
        pixels = self.image.resize((cols, rows), resample).load()
        for y in range(0, rows, 2):
            for x in range(cols):
                top = pixels[x, y]
                bottom = pixels[x, y + 1]
                yield Segment(UPPER_HALF, Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}"))
            yield Segment.line()


class ImageView(Static):
    """Shows a PIL image (or a hint when there is none yet)."""

    DEFAULT_CSS = """
    ImageView { height: auto; min-height: 3; }
    """

    def __init__(self, hint: str = "No image yet.", **kwargs) -> None:
        super().__init__(hint, **kwargs)
        self.hint = hint
        self.image: Image.Image | None = None

    def show(self, image: Image.Image | None) -> None:
        self.image = image
        self.update(HalfBlockImage(image) if image is not None else self.hint)
