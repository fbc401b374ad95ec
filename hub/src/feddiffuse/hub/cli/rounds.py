"""`feddiffuse-hub round`: the admin moves the current round on from the command line.

Both commands write to the hub directory's database; the hub serving it acts on that within
a second (it reads its state there). With no hub serving, a closed round is aggregated when
`serve` starts.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from ._common import HubDir, fail, user_errors

round_app = typer.Typer(help="Close or extend the current round.", no_args_is_help=True)


def _echo_note(hub) -> None:
    typer.echo(hub.status().note or "")


@round_app.command("close")
def close(hub_dir: HubDir) -> None:
    """Close the current round now: it aggregates what has been reported; with no report the
    global model is kept and the next round opens."""
    from ..coordinator import Hub

    with user_errors(), Hub.open(hub_dir) as hub:
        try:
            hub.close_round_now()
        except Exception as exc:
            _refused(exc)
        typer.echo(f"Round {hub.store.federation().current_round} is closing; the serving hub "
                   "aggregates it (or `serve` does when it starts).")


@round_app.command("extend")
def extend(hub_dir: HubDir,
           seconds: Annotated[float, typer.Argument(help="Seconds to add to the deadline "
                                                         "(counted from now if it passed).")]
           ) -> None:
    """Move the current round's deadline back."""
    from ..coordinator import Hub

    with user_errors():
        if not (math.isfinite(seconds) and 0 < seconds <= 7 * 24 * 3600):
            fail("SECONDS must be a positive number of seconds, at most a week.")
        with Hub.open(hub_dir) as hub:
            try:
                hub.extend_round(seconds)
            except Exception as exc:
                _refused(exc)
            _echo_note(hub)


def _refused(exc: Exception) -> None:
    from ..errors import HubError

    if isinstance(exc, HubError):
        fail(exc.message[0].upper() + exc.message[1:] + ".")
    raise exc
