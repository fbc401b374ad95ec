"""`feddiffuse comm`: replay the communication ledger without training."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..codecs import CODEC_HELP
from ..comm import replay_ledger
from ..methods import METHODS
from ..payloads import LinkCodecs
from .info import PRESET_HELP


def comm(
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "paper-fmnist",
    method: Annotated[str, typer.Option(help=f"Method: {', '.join(METHODS)}.")] = "full",
    clients: Annotated[int, typer.Option(help="Number of clients K.")] = 10,
    rounds: Annotated[int, typer.Option(help="Number of rounds R.")] = 15,
    seed: Annotated[int, typer.Option(help="Seed of the USplit assignments.")] = 0,
    samples_per_client: Annotated[int, typer.Option(
        help="Sample count written in each upload's metadata (affects header bytes only)."
    )] = 6000,
    uplink_codec: Annotated[str, typer.Option(help=f"Codec of the uploads: {CODEC_HELP}")
                            ] = "fp32",
    downlink_codec: Annotated[str, typer.Option(
        help="Codec of the downloads (lossy: updates from round 2 on, the initial model in "
             "its dense form).")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Count parameters and bytes exchanged by a federation, without training."""
    with user_errors():
        links = LinkCodecs.parse(uplink_codec, downlink_codec)
        ledger = replay_ledger(preset, method, clients, rounds, seed, samples_per_client, links)
        totals = ledger.totals()
        baseline = replay_ledger(preset, "full", clients, rounds, seed, samples_per_client)
        base = baseline.totals()
        saving = 1 - totals["total_params"] / base["total_params"]
        bytes_ratio = totals["total_bytes"] / base["total_bytes"]
        if as_json:
            typer.echo(json.dumps({
                "preset": preset, "method": method, "clients": clients, "rounds": rounds,
                "dtype": "float32", "uplink_codec": links.uplink.name,
                "downlink_codec": links.downlink.name, **totals,
                "saving_vs_full": saving,
                "full_fp32_total_bytes": base["total_bytes"],
                "bytes_vs_full_fp32": bytes_ratio,
                "per_client": ledger.per_client(),
                "per_round": ledger.per_round(),
            }, indent=2))
            return
        typer.echo(f"{method} on {preset}, K = {clients}, R = {rounds} (safetensors; uplink "
                   f"{links.uplink.name}, downlink {links.downlink.name})")
        typer.echo(f"  {'':<10} {'parameters':>15} {'bytes':>15}")
        for d in ("uplink", "downlink", "total"):
            typer.echo(f"  {d:<10} {totals[f'{d}_params']:>15,} {totals[f'{d}_bytes']:>15,}")
        typer.echo(f"  {saving:.1%} fewer parameters than full FedAvg")
        typer.echo(f"  {bytes_ratio:.4f}x the bytes of full FedAvg in fp32")
