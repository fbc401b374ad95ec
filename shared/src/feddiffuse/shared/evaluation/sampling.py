"""Generate evaluation images from one model or from each client's personal model.

Personal models (ulatdec, udec) are evaluated as in the paper: every client's model is
sampled, the images are pooled into one set, and each client's own set is scored too.
``personal="each"`` draws `samples` images from every personal model (pooled: K x samples);
``personal="split"`` shares `samples` among them (pooled: `samples`; per client about
samples / K), which keeps CPU grids affordable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..data.dataset import from_model_range
from ..diffusion import DiffusionSchedule, make_generator, sample
from ..errors import UserError
from .evaluate import Evaluator, MetricResult, results_to_dict

PERSONAL_MODES = ("each", "split")
Log = Callable[[str], None]


def generate_images(model: nn.Module, n: int, *, steps: int = 50, seed: int = 0,
                    device: torch.device | str = "cpu", batch_size: int = 250,
                    schedule: DiffusionSchedule | None = None,
                    channels_last: bool = True) -> torch.Tensor:
    """`n` DDIM samples of `model` as uint8 N x C x H x W on the CPU (seeded, batched)."""
    device = torch.device(device)
    schedule = (schedule or DiffusionSchedule.linear()).to(device)
    model.to(device)
    if channels_last:  # faster convolutions on CPUs; see benchmarks/sample_speed.py
        model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            x = sample(model, schedule, n, make_generator(seed, device), "ddim", steps=steps,
                       device=device, batch_size=batch_size)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return from_model_range(x)


def split_counts(total: int, parts: int) -> list[int]:
    """`total` shared as evenly as possible among `parts` (the first ones get one more)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def evaluate_models(evaluator: Evaluator, model: nn.Module,
                    weights: Mapping[str, Mapping[str, torch.Tensor]], samples: int, *,
                    personal: str = "each", steps: int = 50, seed: int = 0,
                    device: torch.device | str = "cpu", log: Log | None = None) -> dict:
    """Sample and score one global model (one entry in `weights`) or several personal ones.

    `model` is loaded with each entry of `weights` in turn. Returns a JSON-ready dict with the
    pooled `metrics`, `per_client` metrics when there are several models, and timings.
    """
    log = log or (lambda _m: None)
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
    log(f"evaluation: sampling {sum(counts)} images (DDIM {steps} steps) from {len(names)} "
        f"{'personal models' if several else 'model'}")
    sets: dict[str, torch.Tensor] = {}
    for j, name in enumerate(names):
        model.load_state_dict(dict(weights[name]), strict=True)
        sets[name] = generate_images(model, counts[j], steps=steps, seed=seed + 7919 * j,
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
    return {
        "models": "personal" if several else "global",
        "personal": personal if several else None,
        "sampler": {"name": "ddim", "steps": steps, "eta": 0.0, "seed": seed},
        "samples": int(pooled.shape[0]),
        "metrics": results_to_dict(metrics),
        "per_client": {c: {"samples": int(sets[c].shape[0]), "metrics": results_to_dict(m)}
                       for c, m in per_client.items()},
        "seconds": {"sampling": round(sampling_seconds, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
