"""Fashion-MNIST from the four IDX ``.gz`` files, parsed here with gzip and numpy.

Where the files are looked for, in order (:func:`fashion_mnist_candidates`):

1. ``data_dir`` when given: the folder itself, then torchvision's layout
   ``data_dir/FashionMNIST/raw/``;
2. torchvision's layout under the user cache: ``<user cache>/FashionMNIST/raw/``;
3. the system folder of the Debian package ``dataset-fashion-mnist``,
   ``/usr/share/datasets/fashion-mnist`` (override with ``FEDDIFFUSE_FMNIST_SYSTEM_DIR``).

A folder qualifies when it holds the image and label files of the requested split, either
gzipped (``train-images-idx3-ubyte.gz``) or already unpacked (``train-images-idx3-ubyte``).
If none does and ``download`` is true, torchvision downloads the dataset into (2).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import platformdirs
import torch

from feddiffuse.shared.data.dataset import ImageDataset
from feddiffuse.shared.errors import DataNotFoundError, UserError

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SYSTEM_DIR_ENV = "FEDDIFFUSE_FMNIST_SYSTEM_DIR"
DEFAULT_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_FILES: tuple[str, ...] = FILES["train"] + FILES["test"]

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def default_cache_dir() -> Path:
    """FedDiffuse's user cache folder (``platformdirs.user_cache_dir("feddiffuse")``)."""
    return Path(platformdirs.user_cache_dir("feddiffuse"))


def system_dir() -> Path:
    """The Debian package's folder, or ``$FEDDIFFUSE_FMNIST_SYSTEM_DIR`` when set."""
    return Path(os.environ.get(SYSTEM_DIR_ENV) or DEFAULT_SYSTEM_DIR)


def fashion_mnist_candidates(data_dir: str | Path | None = None) -> list[Path]:
    """The folders searched for the IDX files, in order of precedence."""
    candidates: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        candidates += [root, root / "FashionMNIST" / "raw"]
    candidates.append(default_cache_dir() / "FashionMNIST" / "raw")
    candidates.append(system_dir())
    return candidates


def _resolve(folder: Path, name: str) -> Path | None:
    """``folder/name`` (gzipped) or its unpacked twin without ``.gz``, whichever exists."""
    for path in (folder / name, folder / name.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def find_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> Path | None:
    """The first candidate folder that holds both files of ``split``, or ``None``."""
    images_name, labels_name = FILES[_check_split(split)]
    for folder in fashion_mnist_candidates(data_dir):
        if _resolve(folder, images_name) and _resolve(folder, labels_name):
            return folder
    return None


def _check_split(split: str) -> str:
    if split not in FILES:
        raise UserError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}; pick one.")
    return split


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into a uint8 array, checking magic and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataNotFoundError(
            f"Could not read {path} ({exc}); delete the file and fetch Fashion-MNIST again."
        ) from None
    header_len = 4 + 4 * ndim
    if len(raw) < header_len or int.from_bytes(raw[:4], "big") != magic:
        raise DataNotFoundError(
            f"{path} is not a valid IDX file (bad magic number); "
            "delete it and fetch Fashion-MNIST again."
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise DataNotFoundError(
            f"{path} is truncated or corrupt ({len(raw) - header_len} data bytes, expected "
            f"{expected}); delete it and fetch Fashion-MNIST again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=8)
def _parse_cached(
    images_path: str, labels_path: str, stamp: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``stamp`` (sizes and mtimes) makes a replaced file miss the cache.
    images = _read_idx(Path(images_path), _IMAGES_MAGIC, 3)
    labels = _read_idx(Path(labels_path), _LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; fetch a matching pair of Fashion-MNIST files."
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataNotFoundError(
            f"{labels_path} has labels outside 0-9; it is not Fashion-MNIST, fetch it again."
        )
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1).contiguous()
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return image_tensor, label_tensor


def _load_from(folder: Path, split: str) -> ImageDataset:
    images_name, labels_name = FILES[split]
    images_path = _resolve(folder, images_name)
    labels_path = _resolve(folder, labels_name)
    if images_path is None or labels_path is None:  # pragma: no cover - checked by caller
        raise DataNotFoundError(f"Fashion-MNIST {split} files are missing from {folder}.")
    si, sl = images_path.stat(), labels_path.stat()
    stamp = (si.st_size, si.st_mtime_ns, sl.st_size, sl.st_mtime_ns)
    images, labels = _parse_cached(str(images_path.resolve()), str(labels_path.resolve()), stamp)
    # Clones keep the in-process cache safe from callers that modify their tensors.
    return ImageDataset("fashion-mnist", images.clone(), labels.clone(), len(FASHION_MNIST_CLASSES))


def _download(cache_dir: Path) -> Exception | None:
    """Let torchvision download Fashion-MNIST into ``cache_dir/FashionMNIST/raw``."""
    try:
        from torchvision import datasets

        cache_dir.mkdir(parents=True, exist_ok=True)
        datasets.FashionMNIST(root=str(cache_dir), train=True, download=True)
        datasets.FashionMNIST(root=str(cache_dir), train=False, download=True)
    except Exception as exc:  # any failure means "offline": report it, do not crash
        return exc
    return None


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None, download: bool = True
) -> ImageDataset:
    """Fashion-MNIST ``split`` ("train": 60,000 or "test": 10,000) as 1x28x28 uint8 images.

    Labels are the 10 classes of :data:`FASHION_MNIST_CLASSES`. Parsed files are cached in
    process, keyed on path, size and modification time; each call returns fresh tensors.
    """
    split = _check_split(split)
    folder = find_fashion_mnist(split, data_dir)
    if folder is not None:
        return _load_from(folder, split)
    cache_dir = default_cache_dir()
    cache_raw = cache_dir / "FashionMNIST" / "raw"
    failure: Exception | None = None
    if download:
        failure = _download(cache_dir)
        images_name, labels_name = FILES[split]
        if _resolve(cache_raw, images_name) and _resolve(cache_raw, labels_name):
            return _load_from(cache_raw, split)
    searched = ", ".join(str(p) for p in fashion_mnist_candidates(data_dir))
    reason = ""
    if failure is not None:
        first_line = (str(failure).strip().splitlines() or [""])[0]
        reason = f" (the download failed: {type(failure).__name__}: {first_line})"
    online = (
        f"or go online so torchvision can download it into {cache_raw}{reason}"
        if download
        else f"or allow the download so torchvision can fetch it into {cache_raw}"
    )
    raise DataNotFoundError(
        f"Fashion-MNIST was not found (searched {searched}); pass --data-dir DIR with the four "
        f"IDX .gz files ({', '.join(ALL_FILES)}), install the Debian package {DEBIAN_PACKAGE} "
        f"(apt-get install {DEBIAN_PACKAGE}), {online}."
    )
