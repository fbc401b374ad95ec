"""Features of real images, cached under the user cache.

The generated images are compared with `n` training images; the real-vs-real floor compares
those with `n` held-out images (the test split; for a plain image folder, a disjoint second
draw). Both feature sets are cached as safetensors files keyed by dataset, split, sample
count, image format and feature extractor, so a second evaluation reads them back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..data import DATASET_NAMES, load_dataset
from ..data.fashion_mnist import default_cache_dir
from ..errors import UserError
from ..wire import atomic_write_bytes
from .features import FeatureExtractor

REFERENCE_SEED = 0  # which n training (and test) images are the reference: fixed, so cacheable
ROLES = {"reference": "train", "holdout": "test"}

Log = Callable[[str], None]


def features_cache_dir() -> Path:
    return default_cache_dir() / "eval-features"


class RealFeatures:
    """Reference and held-out features of one dataset at one image format."""

    def __init__(self, dataset: str, *, image_size: int, channels: int,
                 data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 use_cache: bool = True, log: Log | None = None) -> None:
        self.spec = dataset
        name = dataset.strip().lower()
        self.named = name in DATASET_NAMES
        self.image_size, self.channels = image_size, channels
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else features_cache_dir()
        self.use_cache = use_cache
        self.log = log or (lambda _m: None)
        if self.named and data_dir is None:
            self.key = name  # the same files wherever the loader finds them
        else:
            where = str(Path(data_dir if self.named else dataset).expanduser().resolve())
            digest = hashlib.sha256(where.encode()).hexdigest()[:10]
            self.key = f"{name if self.named else 'folder'}-{digest}"
        self._memory: dict[tuple[str, int, str], torch.Tensor] = {}

    def describe(self, role: str, n: int) -> str:
        if self.named:
            return f"{self.spec} {ROLES[role]} split, {n} images"
        return f"{'first' if role == 'reference' else 'second'} {n} images of {self.spec}"

    def _images(self, role: str, n: int) -> torch.Tensor:
        fmt = {"image_size": self.image_size, "channels": self.channels}
        if self.named:
            data = load_dataset(self.spec, split=ROLES[role], data_dir=self.data_dir, limit=n,
                                seed=REFERENCE_SEED, **fmt)
            if len(data) < n:
                raise UserError(f"The {ROLES[role]} split of {self.spec} has only {len(data)} "
                                f"images; evaluate with at most that many samples.")
            return data.images
        data = load_dataset(self.spec, limit=2 * n, seed=REFERENCE_SEED, **fmt)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(REFERENCE_SEED))
        part = order[:n] if role == "reference" else order[n:2 * n]
        if part.numel() < n:
            raise UserError(f"{self.spec} holds {len(data)} images; a real-vs-real comparison "
                            f"at {n} samples needs {2 * n}. Evaluate with fewer samples.")
        return data.images.index_select(0, part)

    def cache_path(self, extractor: FeatureExtractor, role: str, n: int) -> Path:
        fmt = f"{self.channels}x{self.image_size}x{self.image_size}"
        name = (f"{self.key}-{ROLES[role] if self.named else role}-n{n}-{fmt}"
                f"-seed{REFERENCE_SEED}-{extractor.id}.safetensors")
        return self.cache_dir / name

    def features(self, extractor: FeatureExtractor, role: str, n: int) -> torch.Tensor:
        """N x D features of the `role` ("reference" or "holdout") images, cached."""
        memo = (role, n, extractor.id)
        if memo in self._memory:
            return self._memory[memo]
        path = self.cache_path(extractor, role, n)
        feats = self._read(path, n, extractor.dim) if self.use_cache else None
        if feats is None:
            images = self._images(role, n)
            self.log(f"  computing {extractor.family} features of {self.describe(role, n)} "
                     f"(cached for next time)")
            feats = extractor.extract(images)
            if self.use_cache:
                atomic_write_bytes(path, st_save({"features": feats.contiguous()},
                                                 metadata={"extractor": extractor.id,
                                                           "dataset": self.spec,
                                                           "role": role, "count": str(n)}))
        self._memory[memo] = feats
        return feats

    @staticmethod
    def _read(path: Path, n: int, dim: int) -> torch.Tensor | None:
        try:
            feats = st_load(path.read_bytes())["features"]
        except (OSError, KeyError, SafetensorError):
            return None  # missing or damaged: recompute and overwrite
        return feats if tuple(feats.shape) == (n, dim) else None
