"""`feddiffuse info`: parameter counts of a preset."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..model import PRESETS, build_unet, count_parameters, get_preset

PRESET_HELP = f"UNet preset: {', '.join(PRESETS)}."


def info(
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "paper-fmnist",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a preset's total and per-segment parameter counts."""
    with user_errors():
        p = get_preset(preset)
        counts = count_parameters(build_unet(p, seed=0))
        cfg = p.config
        if as_json:
            typer.echo(json.dumps({"preset": p.name, **counts,
                                   "image": [cfg.channels, cfg.image_size, cfg.image_size],
                                   "config": cfg.to_dict()}, indent=2))
            return
        typer.echo(f"{p.name}: {p.description}")
        typer.echo(f"  image      {cfg.channels} x {cfg.image_size} x {cfg.image_size}")
        typer.echo(f"  total      {counts['total_params']:>12,}")
        for seg, n in counts["segments"].items():
            share = n / counts["total_params"]
            typer.echo(f"  {seg:<10} {n:>12,}  ({share:.1%})")
