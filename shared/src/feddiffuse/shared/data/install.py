"""Put Fashion-MNIST where the loader finds it, on a fresh machine: `feddiffuse fetch-data`.

In order: nothing to do when the files are already found (see `fashion_mnist_candidates`);
else the Debian package `dataset-fashion-mnist` through apt-get (as root, or with `sudo -n`
when that needs no password); else torchvision's download into the user cache. When all of
these fail, one sentence names the ways to get the data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import DataNotFoundError
from .fashion_mnist import (
    DEBIAN_PACKAGE,
    _download,
    default_cache_dir,
    find_fashion_mnist,
    system_dir,
)

Log = Callable[[str], None]
Runner = Callable[[list[str]], int]


def _run(args: list[str]) -> int:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode


def _apt_prefix(run: Runner) -> list[str] | None:
    """How to call apt-get here: directly as root, through `sudo -n`, or not at all."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is not None and run(["sudo", "-n", "true"]) == 0:
        return ["sudo", "-n"]
    return None


def found(data_dir: str | Path | None = None) -> Path | None:
    """The folder holding both splits, or None."""
    train = find_fashion_mnist("train", data_dir)
    return train if train is not None and find_fashion_mnist("test", data_dir) else None


def ensure_fashion_mnist(data_dir: str | Path | None = None, *, log: Log = print,
                         run: Runner = _run,
                         download: Callable[[Path], Exception | None] = _download) -> Path:
    """Make Fashion-MNIST available; returns its folder or raises DataNotFoundError."""
    where = found(data_dir)
    if where is not None:
        log(f"Fashion-MNIST: found in {where}")
        return where
    tried: list[str] = []
    prefix = _apt_prefix(run)
    if prefix is None:
        tried.append("apt-get is not available without a password")
    else:
        log(f"Fashion-MNIST: installing the Debian package {DEBIAN_PACKAGE} with apt-get ...")
        install = [*prefix, "apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]
        if run(install) != 0:  # a fresh machine has no package lists yet
            run([*prefix, "apt-get", "update", "-qq"])
            run(install)
        where = found(data_dir)
        if where is not None:
            log(f"Fashion-MNIST: installed in {where}")
            return where
        tried.append(f"apt-get could not install {DEBIAN_PACKAGE}")
    cache = default_cache_dir()
    log(f"Fashion-MNIST: downloading with torchvision into {cache} ...")
    failure = download(cache)
    where = found(data_dir)
    if where is not None:
        log(f"Fashion-MNIST: downloaded into {where}")
        return where
    tried.append("torchvision's download failed" + (f" ({type(failure).__name__})"
                                                     if failure else ""))
    raise DataNotFoundError(
        f"Fashion-MNIST is not on this machine and could not be fetched ({'; '.join(tried)}): "
        f"install the Debian package {DEBIAN_PACKAGE} (sudo apt-get install "
        f"{DEBIAN_PACKAGE}, which puts it in {system_dir()}), or put the four IDX .gz files "
        f"in a folder and pass --data-dir, or go online so torchvision can download them into "
        f"{cache / 'FashionMNIST' / 'raw'}.")
