"""Feature extractors: uint8 images in, one feature vector per image out.

Each extractor runs batched under ``torch.inference_mode`` and says what it is (``name``,
``description``) and which exact weights it uses (``id``, part of every cache key).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fmnist_classifier import FEATURE_DIM, WEIGHTS_SHA256, FashionMNISTClassifier, load_classifier

Progress = Callable[[int, int], None]  # (images done, total)


@dataclass(frozen=True)
class Unavailable:
    """A feature space that cannot be used here, and the reason in one sentence."""

    reason: str


class FeatureExtractor(ABC):
    family: str  # "inception" or "fmnist": which metrics it serves
    dim: int
    batch_size: int = 256

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @property
    @abstractmethod
    def id(self) -> str:
        """Short identifier of the exact weights, safe in a file name."""

    @property
    @abstractmethod
    def description(self) -> str:
        """What the features are, for reports."""

    @abstractmethod
    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        """Features (b x dim, float) of one uint8 batch already on the device."""

    def extract(self, images: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Features (N x dim, float32, CPU) of uint8 N x C x H x W images."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("feature extractors take uint8 N x C x H x W images")
        out = torch.empty((images.shape[0], self.dim), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start:start + self.batch_size].to(self.device)
                feats = self._features(batch).reshape(batch.shape[0], -1)
                out[start:start + batch.shape[0]] = feats.float().cpu()
                if progress is not None:
                    progress(start + batch.shape[0], images.shape[0])
        return out


class FashionMNISTFeatures(FeatureExtractor):
    """Penultimate (128-d) features of the shipped Fashion-MNIST classifier."""

    family = "fmnist"
    dim = FEATURE_DIM
    batch_size = 1000

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.model = load_classifier().to(self.device)
        # channels_last speeds up small conv nets on CPUs (see benchmarks/sample_speed.py).
        self.model.to(memory_format=torch.channels_last)

    @property
    def id(self) -> str:
        return f"fmnist-cnn-{WEIGHTS_SHA256[:12]}"

    @property
    def description(self) -> str:
        return (f"penultimate {FEATURE_DIM}-d features of the project's Fashion-MNIST "
                f"classifier (sha256 {WEIGHTS_SHA256[:12]})")

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        x = FashionMNISTClassifier.prepare(batch.cpu()).to(self.device)
        return self.model.features(x.contiguous(memory_format=torch.channels_last))
