"""`feddiffuse partition`: show how a dataset is split among clients."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..data import (
    class_names,
    client_class_table,
    format_class_table,
    load_dataset,
    partition_indices,
)
from ..model import get_preset
from ..partition_export import export_partition
from .info import PRESET_HELP

DATASET_HELP = "fashion-mnist, celeba, or the path of a folder of images."


def partition(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    clients: Annotated[int, typer.Option(help="Number of clients K.")] = 5,
    split: Annotated[str, typer.Option(help="iid, label-skew or quantity-skew.")] = "iid",
    beta: Annotated[float, typer.Option(help="Dirichlet concentration for the skews.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Partition seed (the paper used 2023).")] = 2023,
    limit: Annotated[int | None, typer.Option(help="Use a random subset of N images.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset.")] = None,
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "paper-fmnist",
    export: Annotated[str | None, typer.Option(
        help="Write each client's share as PNG files, one folder per client under DIR.",
        metavar="DIR")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Partition a dataset among K clients and print the client x class table."""
    with user_errors():
        cfg = get_preset(preset).config
        data = load_dataset(dataset, image_size=cfg.image_size, channels=cfg.channels,
                            data_dir=data_dir, limit=limit, seed=seed)
        parts = partition_indices(len(data), clients, split, labels=data.labels, beta=beta,
                                  seed=seed)
        sizes = [int(p.numel()) for p in parts]
        exported = export_partition(data, parts, export) if export else None
        table = (client_class_table(parts, data.labels, data.num_classes)
                 if data.labels is not None else None)
        if as_json:
            typer.echo(json.dumps({"dataset": data.name, "clients": clients, "split": split,
                                   "beta": beta, "seed": seed, "sizes": sizes,
                                   "classes": list(class_names(data) or []),
                                   "table": table,
                                   "export": exported}, indent=2))
            return
        typer.echo(f"{data.name}: {len(data):,} images, {clients} clients, split {split}"
                   + (f" (beta {beta})" if split != "iid" else "") + f", seed {seed}")
        if table is not None:
            typer.echo(format_class_table(table, class_names(data)))
        else:
            for i, n in enumerate(sizes):
                typer.echo(f"  client {i}: {n:,} images")
        if exported:
            typer.echo(f"wrote {len(data):,} PNG files into {len(exported)} folders under "
                       f"{export}")
