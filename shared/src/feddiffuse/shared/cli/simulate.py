"""`feddiffuse simulate`: a whole federation in one process."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..codecs import CODEC_HELP
from ..evaluation import DEFAULT_METRICS
from ..experiment_protocol import (
    CLIP_HELP,
    DEFAULT_PROTOCOL,
    PERSONAL_MODEL_HELP,
    PROTOCOL_HELP,
    SAMPLER_HELP,
)
from ..methods import METHODS
from ..privacy.options import (
    DP_BUDGET_HELP,
    DP_CLIP_HELP,
    DP_DELTA_HELP,
    DP_HELP,
    DP_NOISE_HELP,
)
from ..recipes import RECIPE_HELP
from ..simulate import SimulationConfig, run_simulation
from ..training import DEVICE_CHOICES
from .evaluate import INCEPTION_HELP, METRICS_HELP
from .info import PRESET_HELP
from .partition import DATASET_HELP


def simulate(
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "tiny",
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    method: Annotated[str, typer.Option(help=f"Method: {', '.join(METHODS)}.")] = "full",
    clients: Annotated[int, typer.Option(help="Number of clients K (1 = centralised).")] = 2,
    rounds: Annotated[int, typer.Option(help="Number of rounds R.")] = 3,
    local_epochs: Annotated[int, typer.Option(help="Local epochs E per round.")] = 1,
    split: Annotated[str, typer.Option(help="iid, label-skew or quantity-skew.")] = "iid",
    beta: Annotated[float, typer.Option(help="Dirichlet concentration for the skews.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = 0,
    partition_seed: Annotated[int | None, typer.Option(
        help="Seed of the partition only (default: the protocol's: product --seed, paper "
             "2023, the paper's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use a random subset of N images.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset.")] = None,
    client_folders: Annotated[str | None, typer.Option(
        help="A folder with one folder of images per client (as `partition --export` writes): "
             "each client trains on its own folder, as the edge client would; --dataset then "
             "only names the evaluation reference.")] = None,
    out: Annotated[str, typer.Option(help="Output folder.")] = "runs/simulate",
    recipe: Annotated[str | None, typer.Option(
        help=RECIPE_HELP + " Default: the protocol's (product: fast, paper: paper).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Batch size (default: the recipe's, else the preset's, 128 or 64).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate (default: the recipe's).")] = None,
    loss: Annotated[str | None, typer.Option(
        help="huber or mse (default: the recipe's).")] = None,
    device: Annotated[str, typer.Option(help=f"{', '.join(DEVICE_CHOICES)}.")] = "auto",
    channels_last: Annotated[bool, typer.Option(
        help="channels_last memory format (default: on; 1.1-1.5x faster on CPUs).")] = True,
    bf16: Annotated[bool | None, typer.Option(
        "--bf16/--no-bf16", help="bf16 autocast in training (default: the recipe's).")] = None,
    samples: Annotated[int, typer.Option(help="Images in samples.png (0: none).")] = 64,
    sample_steps: Annotated[int | None, typer.Option(
        help="Sampling steps for samples.png (default: the evaluation's).")] = None,
    eval_samples: Annotated[int, typer.Option(
        help="Evaluate the final model(s) on N samples and add the metrics to "
             "report.json (0: no evaluation).")] = 0,
    protocol: Annotated[str, typer.Option(help=PROTOCOL_HELP)] = DEFAULT_PROTOCOL,
    sampler: Annotated[str | None, typer.Option(help=SAMPLER_HELP)] = None,
    eval_steps: Annotated[int | None, typer.Option(
        help="Sampling steps of the evaluation (default: the protocol's: product 50, paper "
             "1000).")] = None,
    clip_x0: Annotated[bool | None, typer.Option("--clip-x0/--no-clip-x0",
                                                 help=CLIP_HELP)] = None,
    personal_model: Annotated[str | None, typer.Option(help=PERSONAL_MODEL_HELP)] = None,
    eval_every: Annotated[int, typer.Option(
        help="Also evaluate after every N rounds: a metric curve over rounds and cumulative "
             "bytes in report.json (0: only the final models).")] = 0,
    eval_metrics: Annotated[str, typer.Option(help=METRICS_HELP)] = DEFAULT_METRICS,
    eval_personal: Annotated[str, typer.Option(
        help="Personal models (ulatdec, udec): 'each' samples N from every client's model, "
             "'split' shares N among them.")] = "each",
    inception_weights: Annotated[str | None, typer.Option(help=INCEPTION_HELP)] = None,
    uplink_codec: Annotated[str, typer.Option(
        help=f"Codec of the clients' uploads, with error feedback: {CODEC_HELP}")] = "fp32",
    downlink_codec: Annotated[str, typer.Option(
        help="Codec of the hub's downloads (lossy: updates from round 2 on).")] = "fp32",
    dp: Annotated[str | None, typer.Option(help=DP_HELP)] = None,
    dp_clip: Annotated[float | None, typer.Option(help=DP_CLIP_HELP)] = None,
    dp_noise_multiplier: Annotated[float | None, typer.Option(help=DP_NOISE_HELP)] = None,
    dp_delta: Annotated[float | None, typer.Option(help=DP_DELTA_HELP)] = None,
    dp_epsilon_budget: Annotated[float | None, typer.Option(help=DP_BUDGET_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run a federated simulation and write report.json, samples.png and the weights."""
    with user_errors():
        config = SimulationConfig(
            preset=preset, dataset=dataset, method=method, clients=clients, rounds=rounds,
            local_epochs=local_epochs, split=split, beta=beta, seed=seed,
            partition_seed=partition_seed, limit=limit, data_dir=data_dir,
            client_folders=client_folders, out=out,
            recipe=recipe, batch_size=batch_size, lr=lr, loss=loss, device=device,
            channels_last=channels_last, bf16=bf16, sample_count=samples,
            sample_steps=sample_steps, eval_samples=eval_samples, eval_steps=eval_steps,
            eval_metrics=eval_metrics, eval_personal=eval_personal,
            inception_weights=inception_weights, protocol=protocol, sampler=sampler,
            clip_x0=clip_x0, personal_model=personal_model, eval_every=eval_every,
            uplink_codec=uplink_codec, downlink_codec=downlink_codec, dp=dp,
            dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier, dp_delta=dp_delta,
            dp_epsilon_budget=dp_epsilon_budget)
        log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
        report = run_simulation(config, log=log)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
