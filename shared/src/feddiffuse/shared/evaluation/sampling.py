"""Generate evaluation images from one model or from each client's personal model.

Personal models (ulatdec, udec) are evaluated as in the paper: every client's model is
sampled and scored on its own images, and the headline figure is the **mean over clients**
(with their standard deviation), as the authors averaged per-client FIDs. The K sets are also
pooled into one and scored, as a second figure: a pooled set is larger than each client's, so
it has a smaller small-sample bias and is not comparable with a global model's figure.
``personal="each"`` draws `samples` images from every personal model (pooled: K x samples);
``personal="split"`` shares `samples` among them (pooled: `samples`; per client about
samples / K), which keeps CPU grids affordable but makes each client's figure noisier.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..data.dataset import from_model_range
from ..diffusion import DiffusionSchedule, SamplerSpec, make_generator, sample
from ..errors import UserError
from .evaluate import Evaluator, MetricResult, results_to_dict

PERSONAL_MODES = ("each", "split")
Log = Callable[[str], None]


def generate_images(model: nn.Module, n: int, *, sampler: SamplerSpec | None = None,
                    seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 250,
                    schedule: DiffusionSchedule | None = None,
                    channels_last: bool = True) -> torch.Tensor:
    """`n` samples of `model` as uint8 N x C x H x W on the CPU (seeded, batched).

    `sampler` defaults to DDIM 50 steps with x_0 clipped (the product's evaluation).
    """
    sampler = sampler or SamplerSpec()
    device = torch.device(device)
    schedule = (schedule or DiffusionSchedule.linear()).to(device)
    sampler.validate(schedule.timesteps)
    model.to(device)
    if channels_last:  # faster convolutions on CPUs; see benchmarks/sample_speed.py
        model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            x = sample(model, schedule, n, make_generator(seed, device), sampler.name,
                       steps=sampler.steps, eta=sampler.eta, device=device,
                       batch_size=batch_size, clip_x0=sampler.clips)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return from_model_range(x)


def client_statistics(per_client: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, dict]:
    """Per metric: the mean over clients of each client's own value, their sample standard
    deviation (n - 1; None for one client) and the values by client."""
    out: dict[str, dict] = {}
    names = list(dict.fromkeys(m for results in per_client.values() for m in results))
    for name in names:
        values = {c: float(r[name].value) for c, r in per_client.items()
                  if name in r and r[name].available and r[name].value is not None
                  and math.isfinite(r[name].value)}
        if not values:
            continue
        vals = list(values.values())
        out[name] = {"mean": statistics.fmean(vals),
                     "std": statistics.stdev(vals) if len(vals) > 1 else None,
                     "clients": len(vals), "values": values}
    return out


def split_counts(total: int, parts: int) -> list[int]:
    """`total` shared as evenly as possible among `parts` (the first ones get one more)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def evaluate_models(evaluator: Evaluator, model: nn.Module,
                    weights: Mapping[str, Mapping[str, torch.Tensor]], samples: int, *,
                    personal: str = "each", sampler: SamplerSpec | None = None, seed: int = 0,
                    device: torch.device | str = "cpu", log: Log | None = None,
                    personal_model: str | None = None) -> dict:
    """Sample and score one global model (one entry in `weights`) or several personal ones.

    `model` is loaded with each entry of `weights` in turn. Returns a JSON-ready dict: the
    `headline` value per metric (the model's own for one model; the mean over clients for
    several), `metrics` (the one model's, or the pooled set's), `client_mean` (mean, std and
    values over clients) and `per_client` when there are several models, and timings.
    `personal_model` only labels which personal models they are ("last-local", "merged").
    """
    log = log or (lambda _m: None)
    sampler = (sampler or SamplerSpec()).validate()
    if personal not in PERSONAL_MODES:
        raise UserError(f"Unknown personal-model evaluation {personal!r}; "
                        f"choose one of: {', '.join(PERSONAL_MODES)}.")
    if not weights:
        raise ValueError("no model to evaluate")
    names = list(weights)
    several = len(names) > 1
    counts = (split_counts(samples, len(names)) if several and personal == "split"
              else [samples] * len(names))
    if min(counts) < 2:
        raise UserError(f"{samples} evaluation samples are too few for {len(names)} models; "
                        "use at least 2 per model.")
    started = time.perf_counter()
    log(f"evaluation: sampling {sum(counts)} images ({sampler.describe()}) from {len(names)} "
        f"{'personal models' if several else 'model'}")
    sets: dict[str, torch.Tensor] = {}
    for j, name in enumerate(names):
        model.load_state_dict(dict(weights[name]), strict=True)
        sets[name] = generate_images(model, counts[j], sampler=sampler, seed=seed + 7919 * j,
                                     device=device)
    sampling_seconds = time.perf_counter() - started
    pooled = torch.cat(list(sets.values())) if several else sets[names[0]]
    metrics = evaluator.evaluate(pooled)
    for r in metrics.values():
        log(f"  {'pooled ' if several else ''}{r.line()}")
    per_client: dict[str, dict[str, MetricResult]] = {}
    if several:
        for name, images in sets.items():
            per_client[name] = evaluator.evaluate(images)
            shown = "; ".join(r.line() for r in per_client[name].values() if r.available)
            log(f"  {name}: {shown or 'no metric available'}")
    means = client_statistics(per_client)
    for metric, entry in means.items():
        spread = "" if entry["std"] is None else f" ± {entry['std']:.4g}"
        log(f"  {metric}: mean over {entry['clients']} clients {entry['mean']:.4g}{spread}")
    if several:
        headline = {m: (means[m]["mean"] if m in means else None) for m in metrics}
    else:
        headline = {m: r.value for m, r in metrics.items()}
    return {
        "models": "personal" if several else "global",
        "personal": personal if several else None,
        "personal_model": personal_model if several else None,
        "headline_statistic": "mean over clients" if several else "one model",
        "headline": headline,
        "sampler": {**sampler.to_dict(), "seed": seed},
        "samples": int(pooled.shape[0]),
        "metrics": results_to_dict(metrics),
        "client_mean": means,
        "per_client": {c: {"samples": int(sets[c].shape[0]), "metrics": results_to_dict(m)}
                       for c, m in per_client.items()},
        "seconds": {"sampling": round(sampling_seconds, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
