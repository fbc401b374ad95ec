"""`feddiffuse-hub init`: a new hub directory with its initial global model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.payloads import initial_global

from .blobs import BlobStore
from .paths import DIR_MODE, HubPaths
from .settings import FederationSettings
from .store import open_store
from .store.base import SegmentFileRow, VersionRow
from .tokens import hash_token, new_token
from .weights import DENSE_KEY, encode_global, global_metadata, write_encoded_blob


def init_hub(root: str | Path, settings: FederationSettings, *,
             clock: Callable[[], float] = time.time) -> tuple[str, str]:
    """Create a hub directory; returns (admin token, initial global version).

    Every check comes first, so that a mistake writes nothing.
    """
    paths = HubPaths(Path(root))
    settings = settings.validated()
    if paths.root.exists() and (not paths.root.is_dir() or any(paths.root.iterdir())):
        raise UserError(f"{paths.root} exists and is not an empty folder; give a new or empty "
                        "folder for the hub.")
    if not paths.root.parent.is_dir():
        raise UserError(f"The folder {paths.root.parent} does not exist; create it first.")
    model = build_unet(settings.preset, seed=settings.seed)
    # With a lossy downlink the first version is the initial broadcast decoded, so that the
    # clients and the hub hold the same bytes.
    links = settings.links
    first, initial_wire = initial_global({n: p.detach() for n, p in model.named_parameters()},
                                         links)
    data = encode_global(first, settings.preset, 1)
    paths.root.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(paths.root, DIR_MODE)  # also when it existed, empty, or umask widened it
    paths.blobs.mkdir(mode=DIR_MODE)
    os.chmod(paths.blobs, DIR_MODE)
    blobs = BlobStore(paths.blobs)
    version = blobs.write_bytes(data)
    token = new_token()
    store = open_store(paths.db, create=True)
    try:
        store.create(settings, VersionRow(version, 1, len(data), clock()), hash_token(token),
                     clock())
        if initial_wire is not None:
            sha, size = write_encoded_blob(blobs, initial_wire,
                                           global_metadata(settings.preset, 1), links.initial)
            store.add_segment_file(SegmentFileRow(version, DENSE_KEY, sha, size))
    finally:
        store.close()
    return token, version
