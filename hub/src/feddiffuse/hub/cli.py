"""The `feddiffuse-hub` admin command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="FedDiffuse hub: publish round manifests, serve the global model, aggregate uploads.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Commands of this tool (more arrive with the hub and client issues)."""


@app.command()
def version() -> None:
    """Print the hub's version and the core version it is pinned to."""
    from importlib.metadata import version as dist_version

    typer.echo(f"feddiffuse-hub {dist_version('feddiffuse-hub')} "
               f"(feddiffuse-core {dist_version('feddiffuse-core')})")


def main() -> None:
    app()
