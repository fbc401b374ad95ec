"""What every command shares: turning user mistakes into one sentence and exit code 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from feddiffuse.shared.errors import UserError

EXIT_USER_ERROR = 2

HubDir = Annotated[Path, typer.Argument(help="The hub directory.", show_default=False)]


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def fail(message: str) -> None:
    raise UserError(message)
