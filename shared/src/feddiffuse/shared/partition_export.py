"""Write a partition as ordinary image folders, one per client, for real clients to train on."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .data import ImageDataset
from .errors import UserError
from .simulate import client_ids


def export_partition(data: ImageDataset, parts: Sequence[torch.Tensor], out: str | Path
                     ) -> dict[str, str]:
    """Write client i's images as PNGs into OUT/client-<i>/; returns client -> folder.

    Each client folder is built in a temporary folder beside it and renamed into place, so a
    crash never leaves a half-written client folder. Existing client folders are not touched:
    exporting over them is refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --export folder.")
    ids = client_ids(len(parts))
    taken = [c for c in ids if (out / c).exists()]
    if taken:
        raise UserError(f"{out / taken[0]} already exists; export into an empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    folders: dict[str, str] = {}
    for cid, idx in zip(ids, parts, strict=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".{cid}.", dir=out))
        try:
            for j, i in enumerate(idx.tolist()):
                img = data.images[i]
                array = img.permute(1, 2, 0).numpy()
                pil = Image.fromarray(array[:, :, 0] if img.shape[0] == 1 else array)
                label = "" if data.labels is None else f"_c{int(data.labels[i])}"
                pil.save(tmp / f"{j:06d}{label}.png")
            os.replace(tmp, out / cid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        folders[cid] = str(out / cid)
    return folders
