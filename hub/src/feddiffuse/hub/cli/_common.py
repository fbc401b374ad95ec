"""What every command shares: turning user mistakes into one sentence and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from feddiffuse.shared.cli_errors import EXIT_USER_ERROR, user_errors
from feddiffuse.shared.errors import UserError

__all__ = ["EXIT_USER_ERROR", "HubDir", "fail", "user_errors"]

HubDir = Annotated[Path, typer.Argument(help="The hub directory.", show_default=False)]


def fail(message: str) -> None:
    raise UserError(message)
