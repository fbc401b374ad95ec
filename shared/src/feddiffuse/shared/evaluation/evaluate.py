"""Evaluate sets of images: Fréchet distances and KID against real images, with floors.

Metric names (``--metrics``): ``fid`` (Inception Fréchet distance), ``fd_fmnist`` (Fréchet
distance on the Fashion-MNIST classifier's features), ``kid`` (KID beside each requested
Fréchet metric: ``kid_inception``, ``kid_fmnist``; these two may also be named directly).
A metric that cannot be computed here is reported as unavailable, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .features import FashionMNISTFeatures, FeatureExtractor, Unavailable
from .inception import inception_extractor
from .maths import frechet_distance, kernel_distance
from .reference import RealFeatures

Log = Callable[[str], None]

DEFAULT_METRICS = "fid,fd_fmnist,kid"
# Reported metric -> (feature family, statistic).
METRICS: dict[str, tuple[str, str]] = {
    "fid": ("inception", "fd"),
    "kid_inception": ("inception", "kid"),
    "fd_fmnist": ("fmnist", "fd"),
    "kid_fmnist": ("fmnist", "kid"),
}
FRECHET_OF_FAMILY = {"inception": "fid", "fmnist": "fd_fmnist"}
KID_OF_FAMILY = {"inception": "kid_inception", "fmnist": "kid_fmnist"}
METRIC_CHOICES = ("fid", "fd_fmnist", "kid", "kid_inception", "kid_fmnist")


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"fid,fd_fmnist,kid"`` -> ``["fid", "kid_inception", "fd_fmnist", "kid_fmnist"]``."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    choices = f"choose from: {', '.join(METRIC_CHOICES)}"
    if not items:
        raise UserError(f"No metric given; {choices}.")
    for item in items:
        if item not in METRIC_CHOICES:
            raise UserError(f"Unknown metric {item!r}; {choices}.")
    frechet = [m for m in items if m in FRECHET_OF_FAMILY.values()]
    if "kid" in items and not frechet:
        raise UserError("kid is computed beside fid or fd_fmnist; add one of them, or name "
                        "kid_inception or kid_fmnist.")
    out: list[str] = []
    for item in items:
        names = [item] if item != "kid" else []
        if "kid" in items and item in frechet:
            names.append(KID_OF_FAMILY[METRICS[item][0]])
        out += [n for n in names if n not in out]
    return out


@dataclass
class MetricResult:
    """One metric of one image set; `value` None when unavailable (then `reason` says why)."""

    name: str
    available: bool
    value: float | None = None
    samples: int = 0
    real_vs_real: float | None = None  # the same metric between n train and n test images
    reference: str | None = None
    features: str | None = None
    std: float | None = None  # KID over random subsets, when the sets are large
    reason: str | None = None  # why it is unavailable, or why it has no floor

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in
                ("value", "real_vs_real")}

    def line(self) -> str:
        if not self.available:
            return f"{self.name}: unavailable ({self.reason})"
        floor = "n/a" if self.real_vs_real is None else format_value(self.real_vs_real)
        return (f"{self.name} = {format_value(self.value)} on {self.samples} samples "
                f"(real vs real {floor})")


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def _extractor(family: str, dataset: str, inception_weights: str | Path | None,
               device: torch.device | str) -> FeatureExtractor | Unavailable:
    if family == "inception":
        return inception_extractor(inception_weights, device)
    if dataset.strip().lower() != "fashion-mnist":
        return Unavailable(f"fd_fmnist and kid_fmnist use a Fashion-MNIST classifier and are "
                           f"defined only for the fashion-mnist dataset, not {dataset}")
    return FashionMNISTFeatures(device)


class Evaluator:
    """Resolve the requested metrics once, then evaluate any number of image sets.

    Extractors are resolved here, before any sampling, so that a missing feature network
    shows up at once and never after an hour of sampling.
    """

    def __init__(self, metrics: str | Sequence[str], dataset: str, *, image_size: int,
                 channels: int, data_dir: str | Path | None = None,
                 inception_weights: str | Path | None = None,
                 device: torch.device | str = "cpu", use_cache: bool = True,
                 log: Log | None = None) -> None:
        self.metrics = parse_metrics(metrics)
        self.log = log or (lambda _m: None)
        families = list(dict.fromkeys(METRICS[m][0] for m in self.metrics))
        self.extractors = {f: _extractor(f, dataset, inception_weights, device) for f in families}
        self.real = RealFeatures(dataset, image_size=image_size, channels=channels,
                                 data_dir=data_dir, use_cache=use_cache, log=self.log)
        self._floors: dict[tuple[str, int], tuple[float | None, str | None]] = {}
        self.seconds = {"features": 0.0, "reference": 0.0, "statistics": 0.0}

    @property
    def unavailable(self) -> dict[str, str]:
        return {m: e.reason for m in self.metrics
                if isinstance(e := self.extractors[METRICS[m][0]], Unavailable)}

    @property
    def any_available(self) -> bool:
        return len(self.unavailable) < len(self.metrics)

    def require_some(self) -> None:
        """Raise a UserError naming every reason when no requested metric can be computed."""
        if not self.any_available:
            reasons = "; ".join(f"{m} is unavailable: {r}" for m, r in self.unavailable.items())
            raise UserError(reasons[0].upper() + reasons[1:] + ".")

    def _statistic(self, stat: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float | None]:
        if stat == "fd":
            return frechet_distance(a, b), None
        return kernel_distance(a, b)

    def _floor(self, name: str, extractor: FeatureExtractor,
               reference: torch.Tensor) -> tuple[float | None, str | None]:
        """The real-vs-real value at this sample count, or None and why not."""
        n = int(reference.shape[0])
        if (name, n) not in self._floors:
            t = time.perf_counter()
            try:
                holdout = self.real.features(extractor, "holdout", n)
            except UserError as exc:
                self._floors[(name, n)] = (None, f"no real-vs-real floor: {exc}")
            else:
                value = self._statistic(METRICS[name][1], holdout, reference)[0]
                self._floors[(name, n)] = (value, None)
            self.seconds["reference"] += time.perf_counter() - t
        return self._floors[(name, n)]

    def evaluate(self, images: torch.Tensor) -> dict[str, MetricResult]:
        """All requested metrics of one set of generated uint8 images."""
        n = int(images.shape[0])
        if n < 2:
            raise UserError("Evaluation needs at least 2 generated images.")
        results: dict[str, MetricResult] = {}
        generated: dict[str, torch.Tensor] = {}
        for name in self.metrics:
            family, stat = METRICS[name]
            extractor = self.extractors[family]
            if isinstance(extractor, Unavailable):
                results[name] = MetricResult(name, False, samples=n, reason=extractor.reason)
                continue
            if family not in generated:
                t = time.perf_counter()
                generated[family] = extractor.extract(images)
                self.seconds["features"] += time.perf_counter() - t
            t = time.perf_counter()
            reference = self.real.features(extractor, "reference", n)
            self.seconds["reference"] += time.perf_counter() - t
            t = time.perf_counter()
            value, std = self._statistic(stat, generated[family], reference)
            self.seconds["statistics"] += time.perf_counter() - t
            floor, note = self._floor(name, extractor, reference)
            results[name] = MetricResult(
                name, True, value=value, samples=n, real_vs_real=floor,
                reference=self.real.describe("reference", n), features=extractor.description,
                std=std, reason=note)
        return results


def results_to_dict(results: dict[str, MetricResult]) -> dict[str, dict]:
    return {name: r.to_dict() for name, r in results.items()}
