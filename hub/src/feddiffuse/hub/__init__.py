"""FedDiffuse hub: the HTTP service an admin runs to coordinate federated rounds.

Public surface (imported lazily, so that `feddiffuse-hub --help` does not load PyTorch):

- `init_hub(dir, FederationSettings(...))` creates a hub directory; returns the admin token.
- `Hub.open(dir, serve=True)` opens one and drives its rounds; `create_app(hub)` is its ASGI app.
- `HubError` is what a refused request raises (an ErrorCode and a sentence).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FederationSettings", "Hub", "HubError", "create_app", "init_hub"]

_WHERE = {"FederationSettings": "settings", "Hub": "coordinator", "HubError": "errors",
          "create_app": "app", "init_hub": "create"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
