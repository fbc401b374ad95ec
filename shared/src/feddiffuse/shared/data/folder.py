"""A folder of PNG/JPEG images (searched recursively) as an unlabelled dataset.

Every image is converted to ``L`` (1 channel) or ``RGB`` (3 channels); transparent images
are laid on white first. It is then resized so that its short side equals ``image_size``
(bicubic, antialiased by PIL) and centre-cropped to ``image_size x image_size``. Files that
cannot be decoded are skipped and reported in one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from feddiffuse.shared.data.dataset import ImageDataset
from feddiffuse.shared.errors import DataNotFoundError, UserError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"The image folder {folder} does not exist; check the path.")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point --dataset at a folder of images.")
    return folder


def image_paths(path: str | Path) -> list[Path]:
    """All candidate image files under ``path`` (recursive), sorted for determinism."""
    folder = _check_folder(path)
    found = [
        Path(root) / name
        for root, _dirs, files in os.walk(folder)
        for name in files
        if _is_image_name(name)
    ]
    return sorted(found)


def count_images(path: str | Path) -> int:
    """How many candidate image files (by extension) are under ``path``; nothing is decoded."""
    folder = _check_folder(path)
    return sum(
        1 for _root, _dirs, files in os.walk(folder) for name in files if _is_image_name(name)
    )


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` or ``RGB``, compositing any transparency onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        image = background
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def resize_short_side_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic), then centre-crop to ``size x size``."""
    w, h = image.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, max(size, round(h * size / w))
        else:
            new_w, new_h = max(size, round(w * size / h)), size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def image_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """A converted PIL image as a ``C x H x W`` uint8 array."""
    array = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        return array[None, :, :]
    return array.transpose(2, 0, 1)


def check_format(image_size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, not {channels}; pick a preset with 1 or 3.")
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, not {image_size}.")


def decode_images(
    paths: Sequence[Path],
    prepare: Callable[[Image.Image], np.ndarray],
    *,
    limit: int | None = None,
    seed: int | None = None,
    what: str = "image",
) -> tuple[list[np.ndarray], list[int]]:
    """Decode ``paths`` with ``prepare``; skip unreadable ones with a single warning.

    Without ``seed`` the paths are tried in order; with ``seed`` in the order of
    ``torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))``. Decoding
    stops after ``limit`` usable images. Returns the arrays and their indices into ``paths``,
    both in ascending index order.
    """
    if seed is None:
        order: Sequence[int] = range(len(paths))
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(paths), generator=generator).tolist()
    decoded: list[tuple[int, np.ndarray]] = []
    bad: list[Path] = []
    for i in order:
        if limit is not None and len(decoded) >= limit:
            break
        try:
            with Image.open(paths[i]) as image:
                image.load()
                array = prepare(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(paths[i])
            continue
        decoded.append((i, array))
    if bad:
        first = bad[0] if seed is None else min(bad)
        warnings.warn(
            f"Skipped {len(bad)} unreadable {what} file(s); the first is {first}.",
            RuntimeWarning,
            stacklevel=3,
        )
    decoded.sort(key=lambda item: item[0])
    return [a for _, a in decoded], [i for i, _ in decoded]


def load_image_folder(
    path: str | Path,
    image_size: int,
    channels: int,
    limit: int | None = None,
    *,
    seed: int | None = None,
) -> ImageDataset:
    """Every PNG/JPEG under ``path`` (recursive, sorted paths) as ``channels x S x S`` uint8.

    ``limit`` keeps at most that many usable images: the first ones in sorted order, or,
    when ``seed`` is given, a seeded random choice (returned in sorted-path order). The
    dataset is unlabelled (``labels=None``, ``num_classes=0``) and named after ``path``.
    """
    check_format(image_size, channels)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, not {limit}.")
    folder = _check_folder(path)
    paths = image_paths(folder)

    def prepare(image: Image.Image) -> np.ndarray:
        converted = _to_mode(image, channels)
        return image_to_array(resize_short_side_and_crop(converted, image_size), channels)

    arrays, _ = decode_images(paths, prepare, limit=limit, seed=seed, what="image")
    if not arrays:
        detail = f" ({len(paths)} candidate files were unreadable)" if paths else ""
        raise DataNotFoundError(
            f"No usable PNG or JPEG images found in {folder}{detail}; "
            "point --dataset at a folder of images."
        )
    images = torch.from_numpy(np.stack(arrays)).contiguous()
    return ImageDataset(str(path), images, None, 0)
