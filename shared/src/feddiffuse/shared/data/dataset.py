"""The in-memory image dataset every loader returns, and the pixel-range helpers.

Datasets in FedDiffuse are small enough to keep as one preloaded ``uint8`` tensor
(``N x C x H x W``); training converts batches to the model's ``[-1, 1]`` range on the fly
with :func:`to_model_range`, and sampling converts back with :func:`from_model_range`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from feddiffuse.shared.errors import UserError


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Images (and optionally labels) held in memory.

    ``images`` is ``uint8``, ``N x C x H x W`` and contiguous; ``labels`` is ``int64`` of
    length ``N`` or ``None`` for an unlabelled dataset, in which case ``num_classes`` is 0.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError("ImageDataset.images must be a uint8 tensor")
        if images.dim() != 4:
            raise ValueError(
                f"ImageDataset.images must be N x C x H x W, got {tuple(images.shape)}"
            )
        if not images.is_contiguous():
            object.__setattr__(self, "images", images.contiguous())
        labels = self.labels
        if labels is None:
            if self.num_classes != 0:
                raise ValueError("an unlabelled ImageDataset must have num_classes == 0")
            return
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise TypeError("ImageDataset.labels must be a 1-D tensor or None")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ImageDataset has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.dtype != torch.int64:
            object.__setattr__(self, "labels", labels.to(torch.int64))
        if self.num_classes < 1:
            raise ValueError("a labelled ImageDataset must have num_classes >= 1")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={c}x{h}x{w}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        """The dataset restricted to ``indices`` (in that order); a boolean mask also works."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        idx = idx.to(torch.int64).flatten()
        images = self.images.index_select(0, idx)
        labels = None if self.labels is None else self.labels.index_select(0, idx)
        return ImageDataset(self.name, images, labels, self.num_classes)


def to_model_range(batch_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels in ``[0, 255]`` to ``float32`` in ``[-1, 1]``: ``x / 127.5 - 1``."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {batch_uint8.dtype}")
    return batch_uint8.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Model output in ``[-1, 1]`` (clamped first) back to rounded ``uint8`` pixels."""
    return ((x.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def conform_images(
    images: torch.Tensor, *, channels: int, image_size: int, chunk: int = 2048
) -> torch.Tensor:
    """Convert a ``uint8`` ``N x C x H x W`` tensor to ``channels`` and ``image_size``.

    The rule, applied only where the native format differs from the requested one:

    * channels 1 -> 3: the grey channel is repeated; 3 -> 1: ITU-R 601 luma
      ``0.299 R + 0.587 G + 0.114 B`` (what PIL's ``convert("L")`` computes).
    * size: bilinear resize with antialiasing so that the short side equals ``image_size``,
      then a centre crop to ``image_size x image_size``; results are rounded back to uint8.

    Work is done in chunks of ``chunk`` images to bound the float memory.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError("conform_images expects a uint8 N x C x H x W tensor")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, not {channels}; pick a preset with 1 or 3.")
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, not {image_size}.")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise UserError(f"images with {c} channels cannot be converted; use 1- or 3-channel data.")
    if c == channels and h == image_size and w == image_size:
        return images
    out = torch.empty((n, channels, image_size, image_size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        out[start : start + chunk] = _conform_chunk(
            images[start : start + chunk], channels, image_size
        )
    return out


def _conform_chunk(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    x = images.to(torch.float32)
    c = x.shape[1]
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if h <= w:
            new_h, new_w = size, max(size, round(w * size / h))
        else:
            new_h, new_w = max(size, round(h * size / w)), size
        if (new_h, new_w) != (h, w):
            x = F.interpolate(
                x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.round().clamp(0, 255).to(torch.uint8)
