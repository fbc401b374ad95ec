"""`feddiffuse fetch-data`: make Fashion-MNIST available on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from ..cli_errors import user_errors


def fetch_data(
    data_dir: Annotated[str | None, typer.Option(
        help="A folder that may already hold the four IDX .gz files.")] = None,
) -> None:
    """Find Fashion-MNIST, else install the Debian package, else download it with torchvision."""
    from ..data.install import ensure_fashion_mnist

    with user_errors():
        ensure_fashion_mnist(data_dir, log=typer.echo)
