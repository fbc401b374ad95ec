"""`feddiffuse-hub token`: create, list and revoke the clients' tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from ..backends import open_hub_store
from ..store import HubStore
from ..tokens import create_client_token, revoke_client_token
from ._common import HubDir, user_errors

token_app = typer.Typer(help="Create, list and revoke client tokens; rotate the admin's.",
                        no_args_is_help=True)


@contextmanager
def _store(hub_dir: Path) -> Iterator[HubStore]:
    store = open_hub_store(hub_dir)
    try:
        yield store
    finally:
        store.close()


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


@token_app.command("create")
def create(hub_dir: HubDir,
           name: Annotated[str, typer.Argument(help="The client's name (its id in the hub).")]
           ) -> None:
    """Create a client token and print it once (only its hash is stored)."""
    with user_errors(), _store(hub_dir) as store:
        token = create_client_token(store, name)
    typer.echo(f"Token for client {name!r} (shown once; give it to the data owner):", err=True)
    typer.echo(token)


@token_app.command("list")
def list_tokens(hub_dir: HubDir,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
                ) -> None:
    """List the tokens: name, role, created, revoked."""
    with user_errors(), _store(hub_dir) as store:
        rows = store.tokens()
    if as_json:
        typer.echo(json.dumps([{"name": r.name, "role": r.role, "created_at": r.created_at,
                                "revoked_at": r.revoked_at} for r in rows], indent=2))
        return
    width = max([len(r.name) for r in rows] + [4])
    typer.echo(f"{'name':<{width}}  role    created              revoked")
    for r in rows:
        typer.echo(f"{r.name:<{width}}  {r.role:<6}  {_when(r.created_at):<19}  "
                   f"{_when(r.revoked_at)}")


@token_app.command("rotate-admin")
def rotate_admin(hub_dir: HubDir) -> None:
    """Replace the admin token: print the new one once; the old one stops working at once
    (also for a hub serving this directory now)."""
    from ..services import TokenService

    with user_errors(), _store(hub_dir) as store:
        token = TokenService(store, time.time).rotate_admin()
    typer.echo("New admin token (shown once; keep it safe; the old one no longer works):",
               err=True)
    typer.echo(token)


@token_app.command("revoke")
def revoke(hub_dir: HubDir,
           name: Annotated[str, typer.Argument(help="The client whose token to revoke.")]
           ) -> None:
    """Revoke a client's token: its requests are refused from now on, an upload of it not yet
    recorded is refused, and it leaves the current round if it has not reported (the hub
    serving the directory does that within a second)."""
    with user_errors(), _store(hub_dir) as store:
        revoke_client_token(store, name)
    typer.echo(f"Revoked the token of {name!r}.")
