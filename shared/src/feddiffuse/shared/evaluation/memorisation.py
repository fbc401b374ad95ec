"""Memorisation audit: does a diffusion model regenerate a data owner's own images?

Diffusion models can memorise training images and regenerate them almost pixel for pixel
(Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023). A
data owner checks it on their own machine: draw samples from the model (seeded), find each
sample's nearest neighbour among the owner's images, and count the samples that are closer
to one of the owner's images than the owner's images are to each other.

A sample is a *near-copy* of an own image when two things hold (in one space):

- it is closer to that image than `threshold`: the owner's images are each matched to their
  nearest *other* own image (leave one out; up to `MAX_CALIBRATION_QUERIES` of them, a seeded
  choice), and the threshold is the `quantile` (5 %) of those distances;
- it is distinctly closer to that image than to the others (Carlini et al.'s ratio test): its
  distance to the nearest over its distance to the `K_RATIO`-th nearest is under the same
  quantile of that ratio among the owner's own images (leave one out again). A blurred or
  dark sample can be as close as a copy to the plainest images of a folder, but it is about
  as close to all of them, so its ratio is near 1.

Leave-one-out rather than half against half, because a sample is matched against the whole
folder (n images), so the calibration queries must face a reference set of that size too
(n - 1, not n / 2: a nearest neighbour among fewer images is farther, which would loosen the
threshold). The share of the owner's own held-out images that pass both tests is what a
model making new images of the same kind scores by chance (`chance`, 3 to 8 % on 64
Fashion-MNIST images; estimated as (passes + 1) / (queries + 1), so never 0). A space is
*flagged* when the samples' count is improbable under it: the one-sided binomial tail
P(X >= copies | n samples, chance) is below `alpha` (1 %). Two spaces:

- pixels: the root-mean-square difference of the images in [0, 1] (what "copy" means in
  Carlini et al. for small images);
- features: the project's Fashion-MNIST classifier (128-d) for 28x28 greyscale images, the
  TF-FID Inception-v3 (2048-d) for other images where its weights are installed, else none
  (the result says why).

Nothing here reads or writes anything but the pairs PNG it is asked to write.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.dataset import from_model_range
from ..diffusion import DiffusionSchedule, SamplerSpec, make_generator, sample
from ..errors import UserError
from ..wire import atomic_write_bytes
from .features import FashionMNISTFeatures, FeatureExtractor, Unavailable
from .fmnist_classifier import IMAGE_SIZE as FMNIST_SIZE

QUANTILE = 0.05  # the share of the owner's held-out images under each threshold
K_RATIO = 5  # the ratio test's far neighbour: distance to the nearest / to the 5th nearest
ALPHA = 0.01  # a space is flagged when its copy count is this improbable without copying
MIN_OWN_IMAGES = 10  # fewer own images than this cannot calibrate a 5 % threshold
MAX_CALIBRATION_QUERIES = 2000  # leave-one-out queries (each against every own image)
PAIRS_SHOWN = 8

# (stage, done, total); stages: "sampling" (steps), "features" (images), "matching" (spaces)
Progress = Callable[[str, int, int], None]


class TooFewImages(UserError):
    """The owner's folder holds too few images to calibrate a threshold."""


@dataclass(frozen=True)
class SpaceResult:
    """The audit in one space: the thresholds, how many samples pass them, the verdict."""

    space: str  # "pixels", "fmnist" or "inception"
    description: str
    threshold: float  # distance to the nearest own image
    ratio_threshold: float  # distance to the nearest / distance to the K_RATIO-th nearest
    chance: float  # the share of the owner's held-out images that pass both
    own_median: float  # the median leave-one-out distance among the owner's images
    copies: int
    samples: int
    p_value: float  # P(X >= copies) for X ~ Binomial(samples, chance)
    flagged: bool
    nearest: list[int] = field(repr=False)  # per sample, the index of its nearest own image
    distances: list[float] = field(repr=False)  # per sample, the distance to it
    ratios: list[float] = field(repr=False)  # per sample, nearest / K_RATIO-th nearest
    near_copy: list[bool] = field(repr=False)  # per sample, whether it passes both

    @property
    def copy_rate(self) -> float:
        return self.copies / self.samples if self.samples else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["copy_rate"] = self.copy_rate
        return data


@dataclass(frozen=True)
class Pair:
    sample: int  # index into the samples
    own: int  # index into the owner's images
    distance: float  # in pixel space
    copy: bool  # a near-copy in any space


@dataclass(frozen=True)
class AuditResult:
    samples: int
    own_images: int
    quantile: float
    alpha: float
    spaces: dict[str, SpaceResult]
    feature_space: str | None  # "fmnist", "inception", or None with `feature_note`
    feature_note: str | None  # why no feature space was used
    pairs: list[Pair]  # the closest samples (pixel space), closest first
    sampler: dict | None = None
    seed: int | None = None

    @property
    def flagged(self) -> bool:
        return any(s.flagged for s in self.spaces.values())

    @property
    def copies(self) -> int:
        """Samples that are near-copies in any space."""
        return sum(any(s.near_copy[i] for s in self.spaces.values())
                   for i in range(self.samples))

    def verdict(self) -> str:
        """One sentence for people."""
        if self.flagged:
            which = ", ".join(describe_space(s.space) for s in self.spaces.values()
                              if s.flagged)
            return (f"The model reproduces some of your images: far more of its samples are "
                    f"near-copies of yours than chance explains (in {which}).")
        return ("No sign that the model reproduces your images: no more of its samples are "
                "near-copies of yours than chance explains.")

    def to_dict(self) -> dict:
        return {
            "flagged": self.flagged,
            "verdict": self.verdict(),
            "samples": self.samples,
            "own_images": self.own_images,
            "quantile": self.quantile,
            "alpha": self.alpha,
            "feature_space": self.feature_space,
            "feature_note": self.feature_note,
            "sampler": self.sampler,
            "seed": self.seed,
            "spaces": {name: s.to_dict() for name, s in self.spaces.items()},
            "pairs": [asdict(p) for p in self.pairs],
        }


def describe_space(space: str) -> str:
    return {"pixels": "pixel space", "fmnist": "Fashion-MNIST classifier features",
            "inception": "Inception-v3 features"}.get(space, space)


# -- maths --------------------------------------------------------------------------------------


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, *, k: int = 1,
                       exclude: torch.Tensor | None = None, chunk: int = 512
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (N x k, ascending) of each query row to its `k` nearest rows of
    `refs`, and those rows' indices.

    `exclude[i]`, when given, is a row of `refs` that query i may not match (itself: leave one
    out). Computed in float64, in chunks of queries, so large folders fit in memory.
    """
    refs64 = refs.to(torch.float64)
    dist = torch.empty((queries.shape[0], k), dtype=torch.float64)
    index = torch.empty((queries.shape[0], k), dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].to(torch.float64)
        d = torch.cdist(q, refs64, compute_mode="donot_use_mm_for_euclid_dist")
        if exclude is not None:
            rows = torch.arange(q.shape[0])
            d[rows, exclude[start:start + chunk]] = math.inf
        best = d.topk(k, dim=1, largest=False, sorted=True)
        dist[start:start + q.shape[0]] = best.values
        index[start:start + q.shape[0]] = best.indices
    return dist, index


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1)))


def nearest_ratio(dist: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest over distance to the farthest of the k columns (1 where all are
    0: no image is nearer than the others)."""
    far = dist[:, -1]
    return torch.where(far > 0, dist[:, 0] / far.clamp(min=1e-300), torch.ones_like(far))


@dataclass(frozen=True)
class Calibration:
    """The owner's own images against each other (leave one out)."""

    threshold: float  # the quantile of the distances to the nearest other own image
    ratio_threshold: float  # the quantile of nearest / k-th nearest
    chance: float  # (held-out images passing both + 1) / (queries + 1)
    median: float  # the median distance to the nearest other own image
    queries: int
    k: int


def ratio_k(own_images: int) -> int:
    return max(1, min(K_RATIO, own_images - 1))


def calibrate(own: torch.Tensor, *, quantile: float = QUANTILE, seed: int = 0,
              max_queries: int = MAX_CALIBRATION_QUERIES) -> Calibration:
    """Thresholds from the leave-one-out neighbours among the `own` rows.

    With more than `max_queries` rows a seeded choice of that many is matched (each against
    every row but itself)."""
    n = own.shape[0]
    if n < 2:
        raise TooFewImages("At least two images are needed to calibrate.")
    queries = torch.arange(n)
    if n > max_queries:
        queries = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_queries]
    k = ratio_k(n)
    dist, _ = nearest_neighbours(own[queries], own, k=k, exclude=queries)
    nearest, ratio = dist[:, 0], nearest_ratio(dist)
    threshold = float(torch.quantile(nearest, quantile))
    ratio_threshold = float(torch.quantile(ratio, quantile))
    passes = int(((nearest < threshold) & (ratio < ratio_threshold)).sum())
    return Calibration(threshold, ratio_threshold, (passes + 1) / (len(queries) + 1),
                       float(nearest.median()), len(queries), k)


def pixel_vectors(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W as rows in [0, 1] scaled by 1 / sqrt(C H W): the Euclidean distance
    of two rows is then the root-mean-square difference of their pixels."""
    flat = images.reshape(images.shape[0], -1).to(torch.float64) / 255.0
    return flat / math.sqrt(flat.shape[1])


def audit_space(space: str, description: str, sample_rows: torch.Tensor,
                own_rows: torch.Tensor, *, quantile: float = QUANTILE, alpha: float = ALPHA,
                seed: int = 0) -> SpaceResult:
    cal = calibrate(own_rows, quantile=quantile, seed=seed)
    dist, index = nearest_neighbours(sample_rows, own_rows, k=cal.k)
    nearest, ratio = dist[:, 0], nearest_ratio(dist)
    near_copy = (nearest < cal.threshold) & (ratio < cal.ratio_threshold)
    copies = int(near_copy.sum())
    n = int(sample_rows.shape[0])
    p_value = binomial_tail(copies, n, cal.chance)
    return SpaceResult(space, description, cal.threshold, cal.ratio_threshold, cal.chance,
                       cal.median, copies, n, p_value, p_value < alpha,
                       index[:, 0].tolist(), nearest.tolist(), ratio.tolist(),
                       near_copy.tolist())


# -- the feature space ------------------------------------------------------------------------


def choose_feature_space(channels: int, image_size: int, device: torch.device | str = "cpu",
                         inception_weights: str | Path | None = None
                         ) -> FeatureExtractor | Unavailable:
    """The Fashion-MNIST classifier for 28x28 greyscale images; Inception for others, where
    its weights are installed; else Unavailable with the reason."""
    if channels == 1 and image_size == FMNIST_SIZE:
        return FashionMNISTFeatures(device)
    from .inception import inception_extractor  # local: loading it costs seconds

    found = inception_extractor(inception_weights, device)
    if isinstance(found, Unavailable):
        return Unavailable(f"only pixel space was used: {found.reason}")
    return found


# -- the audit --------------------------------------------------------------------------------


def audit_images(samples: torch.Tensor, own: torch.Tensor,
                 features: FeatureExtractor | Unavailable | None = None, *,
                 quantile: float = QUANTILE, alpha: float = ALPHA, seed: int = 0,
                 pairs_shown: int = PAIRS_SHOWN, progress: Progress | None = None
                 ) -> AuditResult:
    """Audit uint8 `samples` (N x C x H x W) against the owner's uint8 images `own`.

    `features` adds a feature space (None or Unavailable: pixel space only)."""
    for name, images in (("samples", samples), ("own images", own)):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{name} must be uint8 N x C x H x W")
    if samples.shape[1:] != own.shape[1:]:
        raise ValueError("samples and own images must have the same shape")
    if own.shape[0] < MIN_OWN_IMAGES:
        raise TooFewImages(f"{own.shape[0]} image(s) are too few to calibrate the audit; it "
                           f"needs at least {MIN_OWN_IMAGES} of your images.")
    if samples.shape[0] < 1:
        raise ValueError("no samples to audit")
    report = progress or (lambda _stage, _done, _total: None)
    rows = {"pixels": (pixel_vectors(samples), pixel_vectors(own))}
    descriptions = {"pixels": "root-mean-square pixel difference, pixels in [0, 1]"}
    feature_space = None
    note = features.reason if isinstance(features, Unavailable) else None
    if isinstance(features, FeatureExtractor):
        total = samples.shape[0] + own.shape[0]
        sample_feats = features.extract(samples)
        report("features", samples.shape[0], total)
        own_feats = features.extract(own, lambda done, _t: report(
            "features", samples.shape[0] + done, total))
        feature_space = features.family
        rows[feature_space] = (sample_feats, own_feats)
        descriptions[feature_space] = features.description
    spaces: dict[str, SpaceResult] = {}
    for k, (name, (sample_rows, own_rows)) in enumerate(rows.items()):
        spaces[name] = audit_space(name, descriptions[name], sample_rows, own_rows,
                                   quantile=quantile, alpha=alpha, seed=seed)
        report("matching", k + 1, len(rows))
    pixels = spaces["pixels"]
    # Closest first in pixel space; ties by sample index.
    order = sorted(range(pixels.samples), key=lambda i: (pixels.distances[i], i))
    pairs = [Pair(i, pixels.nearest[i], pixels.distances[i],
                  any(s.near_copy[i] for s in spaces.values()))
             for i in order[:pairs_shown]]
    return AuditResult(int(samples.shape[0]), int(own.shape[0]), quantile, alpha, spaces,
                       feature_space, note, pairs)


def draw_samples(model: nn.Module, n: int, *, sampler: SamplerSpec | None = None,
                 seed: int = 0, device: torch.device | str = "cpu",
                 schedule: DiffusionSchedule | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`n` seeded samples of `model` as uint8 N x C x H x W on the CPU."""
    sampler = (sampler or SamplerSpec()).validate()
    schedule = (schedule or DiffusionSchedule.linear()).to(device)
    sampler.validate(schedule.timesteps)
    model.to(device)
    with torch.inference_mode():
        x = sample(model, schedule, n, make_generator(seed, device), sampler.name,
                   steps=sampler.steps, eta=sampler.eta, device=device, on_step=on_step,
                   clip_x0=sampler.clips)
    return from_model_range(x)


def audit_model(model: nn.Module, own: torch.Tensor, n: int, *,
                sampler: SamplerSpec | None = None, seed: int = 0,
                device: torch.device | str = "cpu",
                schedule: DiffusionSchedule | None = None,
                features: FeatureExtractor | Unavailable | None = None,
                progress: Progress | None = None) -> tuple[AuditResult, torch.Tensor]:
    """Sample `n` images from `model` and audit them against `own`; (result, samples)."""
    if own.shape[0] < MIN_OWN_IMAGES:  # before sampling, which takes the longest
        raise TooFewImages(f"{own.shape[0]} image(s) are too few to calibrate the audit; it "
                           f"needs at least {MIN_OWN_IMAGES} of your images.")
    sampler = (sampler or SamplerSpec()).validate()
    report = progress or (lambda _stage, _done, _total: None)
    samples = draw_samples(model, n, sampler=sampler, seed=seed, device=device,
                           schedule=schedule,
                           on_step=lambda i, total: report("sampling", i, total))
    result = audit_images(samples, own, features, seed=seed, progress=progress)
    result = AuditResult(**{**result.__dict__, "sampler": sampler.to_dict(), "seed": seed})
    return result, samples


# -- the pairs picture ------------------------------------------------------------------------

PAD = 2  # between a sample and its own image
GAP = 8  # between pairs
FRAME = 2  # the red frame of a near-copy
PAIRS_PER_ROW = 4
COPY_RGB = (220, 40, 40)
BACKGROUND_RGB = (255, 255, 255)


def pairs_image(result: AuditResult, samples: torch.Tensor, own: torch.Tensor,
                scale: int = 2) -> Image.Image:
    """The closest pairs side by side, `PAIRS_PER_ROW` to a row: each sample (left) beside
    the owner's image nearest to it (right); near-copies in a red frame."""
    if not result.pairs:
        raise ValueError("no pairs to draw")
    c, h, w = samples.shape[1:]
    cell_w, cell_h = w * scale, h * scale
    pair_w = 2 * cell_w + PAD + 2 * FRAME
    pair_h = cell_h + 2 * FRAME
    cols = min(PAIRS_PER_ROW, len(result.pairs))
    rows = math.ceil(len(result.pairs) / cols)
    canvas = np.empty((GAP + rows * (pair_h + GAP), GAP + cols * (pair_w + GAP), 3), np.uint8)
    canvas[:] = BACKGROUND_RGB

    def rgb(image: torch.Tensor) -> np.ndarray:
        array = image.numpy().transpose(1, 2, 0)
        array = np.repeat(array, 3, axis=2) if c == 1 else array
        return array.repeat(scale, axis=0).repeat(scale, axis=1)

    for k, pair in enumerate(result.pairs):
        top = GAP + (k // cols) * (pair_h + GAP)
        left = GAP + (k % cols) * (pair_w + GAP)
        if pair.copy:
            canvas[top:top + pair_h, left:left + pair_w] = COPY_RGB
        y, x = top + FRAME, left + FRAME
        canvas[y:y + cell_h, x:x + cell_w] = rgb(samples[pair.sample])
        x += cell_w + PAD
        canvas[y:y + cell_h, x:x + cell_w] = rgb(own[pair.own])
    return Image.fromarray(canvas)


def save_pairs(result: AuditResult, samples: torch.Tensor, own: torch.Tensor,
               path: str | Path) -> Path:
    """Write the pairs picture as a PNG, atomically; returns the path."""
    buf = io.BytesIO()
    pairs_image(result, samples, own).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue(), mode=0o600)  # the owner's images: theirs alone
    return path
