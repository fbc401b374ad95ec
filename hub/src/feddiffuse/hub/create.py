"""`feddiffuse-hub init`: a new hub (its directory, store and blobs) with its initial global
model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.payloads import initial_global

from .backends import Backends
from .blobs import BlobStore
from .paths import DIR_MODE, HubPaths
from .settings import FederationSettings
from .store import HubStore
from .store.base import SegmentFileRow, VersionRow
from .tokens import hash_token, new_token
from .weights import DENSE_KEY, encode_global, global_metadata, write_encoded_blob


def init_hub(root: str | Path, settings: FederationSettings, *,
             clock: Callable[[], float] = time.time,
             backends: Backends | None = None) -> tuple[str, str]:
    """Create a hub; returns (admin token, initial global version). Its directory `root`
    holds everything (embedded), or hub.json naming `backends`' database and bucket.

    Every check comes first, so that a mistake writes nothing (in the directory).
    """
    paths = HubPaths(Path(root))
    settings = settings.validated()
    backends = (backends or Backends()).validated()
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
    # The bucket and the database are reached (and the database found empty) before the
    # directory is made.
    blobs: BlobStore | None = None
    store: HubStore | None = None
    try:
        blobs = None if backends.blobs is None else backends.open_blobs(None)
        store = None if backends.store is None else backends.open_store(None, create=True)
        paths.root.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(paths.root, DIR_MODE)  # also when it existed, empty, or umask widened it
        if blobs is None:
            paths.blobs.mkdir(mode=DIR_MODE)
            os.chmod(paths.blobs, DIR_MODE)
            blobs = backends.open_blobs(paths)
        version = blobs.write_bytes(data)
        token = new_token()
        if store is None:
            store = backends.open_store(paths, create=True)
        store.create(settings, VersionRow(version, 1, len(data), clock()), hash_token(token),
                     clock())
        if initial_wire is not None:
            sha, size = write_encoded_blob(blobs, initial_wire,
                                           global_metadata(settings.preset, 1), links.initial)
            store.add_segment_file(SegmentFileRow(version, DENSE_KEY, sha, size))
        if not backends.embedded:
            backends.save(paths)
    finally:
        if store is not None:
            store.close()
        if blobs is not None:
            blobs.close()
    return token, version
