"""The sample grids this client drew, each with a note of the model it came from.

A grid is `samples/grid-YYYYmmdd-HHMMSS.png` in the hub's state folder; beside it the app
writes `grid-....json` with the model's description and how many rounds it had seen. Grids
without a note (drawn by an older client) are listed too, as of an unrecorded model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from feddiffuse.shared.wire import atomic_write_bytes


@dataclass(frozen=True)
class GridNote:
    """What a grid was drawn from; written as JSON beside its PNG."""

    description: str  # "16 samples from the global model ab12... after 3 round(s), ..."
    model: str | None  # the version of the model sampled (12+ hex digits), if known
    rounds_done: int | None  # rounds of the federation that model had seen
    rounds: int | None  # rounds of the federation in all
    images: int
    steps: int


@dataclass(frozen=True)
class PastGrid:
    path: Path
    made: datetime
    note: GridNote | None

    def title(self) -> str:
        """One line for the gallery: when, and from which round's model."""
        when = self.made.strftime("%Y-%m-%d %H:%M:%S")
        note = self.note
        if note is None:
            return f"{when}: model not recorded"
        rounds = ("the initial model" if note.rounds_done == 0
                  else f"after round {note.rounds_done}" if note.rounds_done is not None
                  else "round unknown")
        if note.rounds and note.rounds_done:
            rounds += f" of {note.rounds}"
        model = f", model {note.model[:12]}" if note.model else ""
        return f"{when}: {note.images} images, {rounds}{model}"


def note_path(grid: Path) -> Path:
    return grid.with_suffix(".json")


def write_note(grid: Path, note: GridNote) -> None:
    atomic_write_bytes(note_path(grid), json.dumps(asdict(note), indent=2).encode("utf-8"))


def read_note(grid: Path) -> GridNote | None:
    try:
        data = json.loads(note_path(grid).read_text(encoding="utf-8"))
        return GridNote(**{k: data.get(k) for k in GridNote.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def _made(path: Path) -> datetime:
    stem = path.stem.removeprefix("grid-")
    try:
        return datetime.strptime(stem[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        return datetime.fromtimestamp(path.stat().st_mtime)


def past_grids(samples_dir: Path) -> list[PastGrid]:
    """Every PNG grid in `samples_dir`, newest first."""
    if not samples_dir.is_dir():
        return []
    found = []
    for path in samples_dir.glob("*.png"):
        try:
            found.append(PastGrid(path, _made(path), read_note(path)))
        except OSError:
            continue  # removed while listing
    found.sort(key=lambda g: (g.made, g.path.name), reverse=True)
    return found
