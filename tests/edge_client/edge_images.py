"""Synthetic image folders for the client tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int = 16, size: int = 28, seed: int = 0) -> Path:
    """`n` small PNGs: blobs on a dark background, some grey, some colour, some larger."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = size if i % 4 else size * 2
        yy, xx = np.mgrid[0:side, 0:side]
        cx, cy = rng.uniform(0.3, 0.7, 2) * side
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (side / 6) ** 2))
        grey = (255 * blob).astype(np.uint8)
        if i % 3 == 0:
            Image.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(
                folder / f"img_{i:03d}.png")
        else:
            Image.fromarray(grey).save(folder / f"img_{i:03d}.png")
    return folder
