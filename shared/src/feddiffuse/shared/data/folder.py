"""A folder of images (searched recursively) as an unlabelled dataset.

Every raster format Pillow reads is used (PNG, JPEG, BMP, GIF's first frame, TIFF's first
page, WebP, PNM, TGA, ...). Hidden files and folders, and the thumbnail and metadata
folders that photo tools, NAS boxes and archivers write (`.thumbnails`, `@eaDir`,
`__MACOSX`, `.AppleDouble`, ...), are not images of the owner's and are skipped.

Every image is converted to ``L`` (1 channel) or ``RGB`` (3 channels); transparent images
are laid on white first. It is then resized so that its short side equals ``image_size`` and
centre-cropped to ``image_size x image_size`` by the rule every dataset follows
(`conform_images`: bilinear, antialiased). Files that
cannot be decoded are skipped and reported in one warning.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from feddiffuse.shared.data.dataset import ImageDataset, conform_images
from feddiffuse.shared.errors import DataNotFoundError, UserError

# The photo and raster formats, kept to those this Pillow can open. A list of our own because
# Pillow also registers formats that are not pictures a person keeps (.h5, .eps, .mpeg, ...).
_RASTER_EXTENSIONS = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib",
                      ".gif", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".pnm", ".tga",
                      ".qoi", ".jp2", ".j2k", ".jpx", ".avif", ".pcx", ".sgi")


def _readable_extensions() -> tuple[str, ...]:
    Image.init()
    openable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return tuple(ext for ext in _RASTER_EXTENSIONS if ext in openable)


IMAGE_EXTENSIONS: tuple[str, ...] = _readable_extensions()

# Folders that hold copies or metadata written by tools, never the owner's own images.
TOOL_FOLDERS = frozenset({"@eadir", "__macosx", "#recycle", "@recycle", "$recycle.bin",
                          "#snapshot", "@recently-snapshot", "system volume information"})
HIDDEN = "hidden files and folders"
TOOL = "thumbnail and tool folders"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def walk_images(folder: Path) -> tuple[list[Path], Counter]:
    """The image files under `folder` (sorted) and, per reason, how many were skipped.

    A file is skipped when it or a folder on its way (below `folder`) is hidden (its name
    starts with a dot: `.thumbnails`, `.AppleDouble`, `._photo.jpg`, ...), or when a folder
    on its way is one that tools write (TOOL_FOLDERS: `@eaDir`, `__MACOSX`, ...).
    """
    found: list[Path] = []
    skipped: Counter = Counter()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder).parts
        reason = None
        if any(part.lower() in TOOL_FOLDERS for part in rel):
            reason = TOOL
        elif any(part.startswith(".") for part in rel):
            reason = HIDDEN
        for name in files:
            if not _is_image_name(name):
                continue
            why = reason or (HIDDEN if name.startswith(".") else None)
            if why:
                skipped[why] += 1
            else:
                found.append(Path(root) / name)
        dirs.sort()
    return sorted(found), skipped


def _check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"The image folder {folder} does not exist; check the path.")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point --dataset at a folder of images.")
    return folder


def image_paths(path: str | Path) -> list[Path]:
    """All candidate image files under ``path`` (recursive), sorted for determinism."""
    return walk_images(_check_folder(path))[0]


def count_images(path: str | Path) -> int:
    """How many candidate image files (by extension) are under ``path``; nothing is decoded."""
    return len(image_paths(path))


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` or ``RGB``, compositing any transparency onto white.

    16-bit and float images (mode ``I;16``, ``I``, ``F``) are scaled to 8 bits by their
    range instead of being clipped at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode != "F" and top <= 255.0:
            top = 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
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


def resize_short_side_and_crop(array: np.ndarray, size: int) -> np.ndarray:
    """A ``C x H x W`` uint8 array resized so its short side is ``size``, centre-cropped to
    ``size x size``: the one rule every dataset follows (`dataset.conform_images`: bilinear,
    antialiased), so a folder on a client and the same images in a simulation match."""
    if array.shape[1:] == (size, size):
        return array
    tensor = torch.from_numpy(np.array(array, copy=True))[None]  # PIL arrays are read-only
    return conform_images(tensor, channels=array.shape[0], image_size=size)[0].numpy()


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
    """Every image under ``path`` (recursive, sorted paths; see `walk_images`) as
    ``channels x S x S`` uint8.

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
        return resize_short_side_and_crop(image_to_array(converted, channels), image_size)

    arrays, _ = decode_images(paths, prepare, limit=limit, seed=seed, what="image")
    if not arrays:
        detail = f" ({len(paths)} candidate files were unreadable)" if paths else ""
        raise DataNotFoundError(
            f"No usable images found in {folder}{detail}; "
            "point --dataset at a folder of images."
        )
    images = torch.from_numpy(np.stack(arrays)).contiguous()
    return ImageDataset(str(path), images, None, 0)
