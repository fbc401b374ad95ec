"""A client that holds a model, and folders of the owner's images, for the audit tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from feddiffuse.edge_client.state import HubFolder

URL = "http://hub.example.org:8000"


def holding(weights: dict[str, torch.Tensor] | None, url: str = URL) -> HubFolder:
    """The state folder of a client that joined `url` and holds `weights` (tiny preset) as
    its global model; None: joined, but no model downloaded yet."""
    store = HubFolder(url)
    store.ensure()
    store.write_token("t")
    store.update_info(federation="study", preset="tiny", method="full", rounds=4,
                      client_id="alice", global_round=3 if weights else None)
    if weights is not None:
        store.merge_global(weights, ("encoder", "bottleneck", "decoder"), "ab" * 32, "tiny", 3)
    return store


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    """uint8 N x 1 x H x W images as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"img_{i:03d}.png")
    return folder
