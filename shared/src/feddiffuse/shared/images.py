"""Sample grids as PNG files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .wire import atomic_write_bytes


def grid_image(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """A PIL image of `images` (float in [-1, 1], N x C x H x W) laid out in a grid."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty N x C x H x W tensor")
    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    if images.shape[1] == 1:
        return Image.fromarray(array[:, :, 0])
    return Image.fromarray(array)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid atomically; returns the path."""
    buf = io.BytesIO()
    grid_image(images, nrow).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue(), mode=0o666)  # a picture to share, not a secret
    return path
