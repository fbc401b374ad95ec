"""The `feddiffuse` Typer application: one module per command."""

from __future__ import annotations

import typer

from .comm import comm
from .evaluate import evaluate
from .experiment import experiment
from .fetch_data import fetch_data
from .info import info
from .partition import partition
from .simulate import simulate

app = typer.Typer(
    help="FedDiffuse research tools: inspect models, count communication, partition data, "
         "and simulate federated training of a diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command()(info)
app.command()(comm)
app.command()(partition)
app.command()(simulate)
app.command()(evaluate)
app.command()(experiment)
app.command(name="fetch-data")(fetch_data)


def main() -> None:
    app()
