"""CelebA in torchvision's layout, labelled with the paper's 16 pseudo-classes.

Expected files (``root`` may be the folder above ``celeba/`` or ``celeba/`` itself)::

    root/celeba/img_align_celeba/000001.jpg ...
    root/celeba/list_attr_celeba.txt        (line 1: count; line 2: the 40 attribute names;
                                             then "000001.jpg -1  1 ..." with values +-1)
    root/celeba/list_eval_partition.txt     ("000001.jpg 0"; 0 train, 1 valid, 2 test)

Pseudo-class of an image (:func:`celeba_class`)::

    class = 8 * male + 4 * old + hair

with ``male = 1`` when ``Male`` is 1 (else 0), ``old = 1`` when ``Young`` is -1 (else 0), and
``hair`` the index in :data:`HAIR_ATTRIBUTES` (Black 0, Brown 1, Blond 2, Gray 3) of the first
hair colour set. Images with none of the four hair colours are dropped. Class names are in
:data:`CELEBA_CLASSES`, e.g. class 0 is ``female-young-black``, class 15 ``male-old-gray``.
The authors number the same classes male first (``8 * female + 4 * old + hair``, their
``celeba_labels``): :func:`authors_classes` converts, :data:`AUTHORS_CELEBA_CLASSES` names
them. The numbering matters for the label-skew partition, which draws per class in order.

Pixel range: the product trains CelebA in [-1, 1] as every dataset; the authors kept CelebA
in [0, 1] (their ``transform_celeba`` is ``ToTensor`` with no rescale), see
:func:`to_unit_range` / :func:`from_unit_range`.

Preprocessing as in the paper: centre crop 178 x 178, then resize to ``image_size``
(bilinear, antialiased by PIL), RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from feddiffuse.shared.data.dataset import ImageDataset
from feddiffuse.shared.data.folder import check_format, decode_images, image_to_array
from feddiffuse.shared.errors import DataNotFoundError, UserError

HAIR_ATTRIBUTES: tuple[str, ...] = ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")
CELEBA_CROP = 178
CELEBA_SPLITS: dict[str, int | None] = {"train": 0, "valid": 1, "test": 2, "all": None}
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"

CELEBA_CLASSES: tuple[str, ...] = tuple(
    f"{sex}-{age}-{hair.removesuffix('_Hair').lower()}"
    for sex in ("female", "male")
    for age in ("young", "old")
    for hair in HAIR_ATTRIBUTES
)


AUTHORS_CELEBA_CLASSES: tuple[str, ...] = CELEBA_CLASSES[8:] + CELEBA_CLASSES[:8]
CELEBA_NUMBERINGS = ("female-first", "male-first")


def authors_classes(labels: torch.Tensor) -> torch.Tensor:
    """Pseudo-classes numbered as here (female first) renumbered as the authors' (male 0-7,
    female 8-15); the sex bit flips, age and hair keep their places. Its own inverse."""
    return (labels + 8) % 16


def to_unit_range(batch_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels to ``float32`` in ``[0, 1]`` (``x / 255``), the authors' CelebA range."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"to_unit_range expects uint8 pixels, got {batch_uint8.dtype}")
    return batch_uint8.to(torch.float32) / 255.0


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model output in ``[0, 1]`` (clamped first) back to rounded ``uint8`` pixels."""
    return (x.detach().to(torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def celeba_class(attributes: dict[str, int], numbering: str = "female-first") -> int | None:
    """The pseudo-class (0-15) of one image's ``{attribute: +-1}``, or None if it is dropped.

    ``numbering`` "female-first" (this project's) or "male-first" (the authors').
    """
    if numbering not in CELEBA_NUMBERINGS:
        raise UserError(f"Unknown CelebA class numbering {numbering!r}; choose one of: "
                        f"{', '.join(CELEBA_NUMBERINGS)}.")
    for hair, name in enumerate(HAIR_ATTRIBUTES):
        if attributes[name] == 1:
            male = 1 if attributes["Male"] == 1 else 0
            if numbering == "male-first":
                male = 1 - male
            old = 0 if attributes["Young"] == 1 else 1
            return 8 * male + 4 * old + hair
    return None


def find_celeba_dir(root: str | Path) -> Path:
    """The ``celeba`` folder under (or at) ``root`` that holds the attribute file."""
    base = Path(root).expanduser()
    for folder in (base / "celeba", base):
        if (folder / ATTR_FILE).is_file() and (folder / IMAGE_DIR).is_dir():
            return folder
    raise DataNotFoundError(
        f"CelebA was not found under {base}; --data-dir must hold celeba/{IMAGE_DIR}/*.jpg, "
        f"celeba/{ATTR_FILE} and celeba/{PARTITION_FILE} (torchvision's CelebA layout)."
    )


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parse ``list_attr_celeba.txt``: image names and a ``{attribute: int8 column}`` dict."""
    try:
        lines = path.read_text().splitlines()
        names_line = lines[1].split()
        files: list[str] = []
        rows: list[list[int]] = []
        for line in lines[2:]:
            fields = line.split()
            if not fields:
                continue
            if len(fields) != len(names_line) + 1:
                raise ValueError(f"expected {len(names_line) + 1} fields, got {len(fields)}")
            files.append(fields[0])
            rows.append([int(v) for v in fields[1:]])
    except (OSError, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DataNotFoundError(
            f"Could not parse {path} ({exc}); fetch CelebA's list_attr_celeba.txt again."
        ) from None
    missing = [a for a in ("Male", "Young", *HAIR_ATTRIBUTES) if a not in names_line]
    if missing:
        raise DataNotFoundError(
            f"{path} lacks the attributes {', '.join(missing)}; fetch CelebA's "
            "list_attr_celeba.txt again."
        )
    table = np.asarray(rows, dtype=np.int8).reshape(len(rows), len(names_line))
    return files, {name: table[:, j] for j, name in enumerate(names_line)}


def read_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` into ``{image name: 0 | 1 | 2}``."""
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing; CelebA's train/valid/test splits need list_eval_partition.txt "
            "next to list_attr_celeba.txt (or use split 'all')."
        )
    try:
        partition: dict[str, int] = {}
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields:
                partition[fields[0]] = int(fields[1])
    except (OSError, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DataNotFoundError(
            f"Could not parse {path} ({exc}); fetch CelebA's list_eval_partition.txt again."
        ) from None
    return partition


def pseudo_classes(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Vectorised :func:`celeba_class` for whole attribute columns; -1 marks dropped rows."""
    n = len(columns["Male"])
    hair = np.full(n, -1, dtype=np.int64)
    for index in reversed(range(len(HAIR_ATTRIBUTES))):  # the first set colour wins
        hair[columns[HAIR_ATTRIBUTES[index]] == 1] = index
    male = (columns["Male"] == 1).astype(np.int64)
    old = (columns["Young"] != 1).astype(np.int64)
    return np.where(hair >= 0, 8 * male + 4 * old + hair, -1)


def _prepare(image: Image.Image, image_size: int) -> np.ndarray:
    image = image.convert("RGB")
    w, h = image.size
    crop = min(CELEBA_CROP, w, h)
    left = int(round((w - crop) / 2.0))
    top = int(round((h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    if crop != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image_to_array(image, 3)


def load_celeba(
    root: str | Path,
    image_size: int = 64,
    split: str = "train",
    limit: int | None = None,
    *,
    seed: int | None = None,
) -> ImageDataset:
    """CelebA ``split`` ("train", "valid", "test" or "all") as 3 x S x S uint8 images.

    Labels are the 16 pseudo-classes (see the module docstring); images without one of the
    four hair colours are dropped. ``limit`` keeps at most that many usable images: the first
    in file order, or a seeded random choice when ``seed`` is given (returned in file order).
    Missing or unreadable image files are skipped with one warning.
    """
    check_format(image_size, 3)
    if split not in CELEBA_SPLITS:
        raise UserError(
            f"CelebA has splits {', '.join(CELEBA_SPLITS)}, not {split!r}; pick one of those."
        )
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, not {limit}.")
    folder = find_celeba_dir(root)
    files, columns = read_attributes(folder / ATTR_FILE)
    classes = pseudo_classes(columns)
    keep = classes >= 0
    code = CELEBA_SPLITS[split]
    if code is not None:
        partition = read_partition(folder / PARTITION_FILE)
        keep &= np.array([partition.get(name, -1) == code for name in files], dtype=bool)
    chosen = np.flatnonzero(keep)
    paths = [folder / IMAGE_DIR / files[i] for i in chosen]
    arrays, used = decode_images(
        paths,
        lambda image: _prepare(image, image_size),
        limit=limit,
        seed=seed,
        what="CelebA image",
    )
    if not arrays:
        raise DataNotFoundError(
            f"No usable CelebA images for split {split!r} in {folder / IMAGE_DIR}; check that "
            f"the JPEGs listed in {ATTR_FILE} are there."
        )
    images = torch.from_numpy(np.stack(arrays)).contiguous()
    labels = torch.from_numpy(classes[chosen[used]].astype(np.int64))
    return ImageDataset("celeba", images, labels, len(CELEBA_CLASSES))
