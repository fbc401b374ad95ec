"""Image-quality evaluation: Inception FID, the Fashion-MNIST domain Fréchet distance, KID.

- :class:`Evaluator` resolves the requested metrics (before any sampling) and scores sets of
  uint8 images against cached real-image features, each metric with its sample count and
  its real-vs-real floor (n train vs n test images).
- :func:`evaluate_models` samples a global model, or every personal model (the mean over
  clients as the headline, the pooled set beside it), and scores the images; the simulator
  and ``feddiffuse evaluate`` use it.
- :mod:`.maths` holds the Fréchet distance and the unbiased KID; :mod:`.inception` finds the
  TF-FID Inception weights offline; :mod:`.fmnist_classifier` is the domain feature network.
"""

from .evaluate import (
    DEFAULT_METRICS,
    METRIC_CHOICES,
    METRICS,
    Evaluator,
    MetricResult,
    format_value,
    parse_metrics,
    results_to_dict,
)
from .features import FashionMNISTFeatures, FeatureExtractor, Unavailable
from .inception import InceptionFeatures, find_inception_weights, inception_extractor
from .maths import frechet_distance, frechet_distance_gaussians, kernel_distance, mmd2_unbiased
from .reference import RealFeatures, features_cache_dir
from .sampling import (
    PERSONAL_MODES,
    client_statistics,
    evaluate_models,
    generate_images,
    split_counts,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "METRIC_CHOICES",
    "PERSONAL_MODES",
    "Evaluator",
    "FashionMNISTFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "MetricResult",
    "RealFeatures",
    "Unavailable",
    "client_statistics",
    "evaluate_models",
    "features_cache_dir",
    "find_inception_weights",
    "format_value",
    "frechet_distance",
    "frechet_distance_gaussians",
    "generate_images",
    "inception_extractor",
    "kernel_distance",
    "mmd2_unbiased",
    "parse_metrics",
    "results_to_dict",
    "split_counts",
]
