"""User-facing error handling shared by every command line (feddiffuse, feddiffuse-hub).

A module of its own, outside `feddiffuse.shared.cli`, so that importing it stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from .errors import UserError

EXIT_USER_ERROR = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one sentence on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
