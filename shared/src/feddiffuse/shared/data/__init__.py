"""Datasets and client partitions for FedDiffuse.

:func:`load_dataset` is the one entry point the CLI and the apps use; the individual
loaders, the partitioner and the pixel-range helpers are re-exported here too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from feddiffuse.shared.data.celeba import CELEBA_CLASSES, HAIR_ATTRIBUTES, celeba_class, load_celeba
from feddiffuse.shared.data.dataset import (
    ImageDataset,
    conform_images,
    from_model_range,
    to_model_range,
)
from feddiffuse.shared.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_candidates,
    load_fashion_mnist,
)
from feddiffuse.shared.data.folder import IMAGE_EXTENSIONS, count_images, load_image_folder
from feddiffuse.shared.data.partition import (
    SPLITS,
    client_class_table,
    format_class_table,
    partition_indices,
    quantity_skew_proportions,
)
from feddiffuse.shared.errors import UserError

__all__ = [
    "CELEBA_CLASSES",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "HAIR_ATTRIBUTES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageDataset",
    "celeba_class",
    "class_names",
    "client_class_table",
    "conform_images",
    "count_images",
    "fashion_mnist_candidates",
    "format_class_table",
    "from_model_range",
    "load_celeba",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "partition_indices",
    "quantity_skew_proportions",
    "random_subset_indices",
    "to_model_range",
]

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "celeba")


def class_names(dataset: ImageDataset) -> tuple[str, ...] | None:
    """Human-readable class names of a dataset from :func:`load_dataset`, if it has labels."""
    if dataset.name == "fashion-mnist":
        return FASHION_MNIST_CLASSES
    if dataset.name == "celeba":
        return CELEBA_CLASSES
    return None


def random_subset_indices(num_samples: int, limit: int, seed: int) -> torch.Tensor:
    """``limit`` distinct indices chosen with ``torch.Generator().manual_seed(seed)``, sorted."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_samples, generator=generator)[:limit]
    return chosen.sort().values


def _looks_like_path(spec: str) -> bool:
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in spec for sep in separators) or spec.startswith("~") or Path(spec).is_dir()


def load_dataset(
    spec: str,
    *,
    image_size: int,
    channels: int,
    split: str = "train",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by name or folder and bring it to ``channels x image_size x image_size``.

    ``spec`` is ``"fashion-mnist"`` (``data_dir``: an optional folder with the IDX files;
    ``split`` "train" or "test"), ``"celeba"`` (``data_dir``: the CelebA root, required;
    ``split`` "train", "valid", "test" or "all") or a folder of PNG/JPEG images (anything
    containing a path separator, or an existing directory; ``split`` and ``data_dir`` are
    ignored). The names win over a same-named directory: write ``./celeba`` for the folder.

    ``limit`` keeps a seeded random subset of that many samples (``torch.randperm`` with a
    ``torch.Generator`` seeded by ``seed``, returned in dataset order, not stratified);
    folders and CelebA only decode the chosen images.

    When the native format differs from the requested one it is converted with
    :func:`conform_images`: grey to RGB by repeating the channel, RGB to grey by luma, and
    an antialiased bilinear resize of the short side plus a centre crop (e.g. Fashion-MNIST
    1x28x28 becomes 3x64x64 for a 3x64x64 preset).
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, not {limit}.")
    name = spec.strip().lower()
    if name == "fashion-mnist":
        dataset = load_fashion_mnist(split, data_dir=data_dir)
        if limit is not None and limit < len(dataset):
            dataset = dataset.subset(random_subset_indices(len(dataset), limit, seed))
    elif name == "celeba":
        if data_dir is None:
            raise UserError(
                "CelebA needs --data-dir pointing at its root folder (torchvision's layout, "
                "with celeba/img_align_celeba and celeba/list_attr_celeba.txt)."
            )
        dataset = load_celeba(data_dir, image_size=image_size, split=split, limit=limit, seed=seed)
    elif _looks_like_path(spec):
        dataset = load_image_folder(spec, image_size, channels, limit=limit, seed=seed)
    else:
        raise UserError(
            f"Unknown dataset {spec!r}; use {' or '.join(DATASET_NAMES)}, or the path of a "
            "folder of PNG/JPEG images."
        )
    images = conform_images(dataset.images, channels=channels, image_size=image_size)
    if images is dataset.images:
        return dataset
    return ImageDataset(dataset.name, images, dataset.labels, dataset.num_classes)
