"""The `feddiffuse-client` command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="FedDiffuse edge client: train the shared diffusion model on your own images.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Commands of this tool (more arrive with the hub and client issues)."""


@app.command()
def version() -> None:
    """Print the client's version and the core version it is pinned to."""
    from importlib.metadata import version as dist_version

    typer.echo(f"feddiffuse-client {dist_version('feddiffuse-client')} "
               f"(feddiffuse-core {dist_version('feddiffuse-core')})")


def main() -> None:
    app()
