"""The client's state for one hub, kept on disk so that a crash or Ctrl-C loses at most an epoch.

    <client home>/hubs/<host>-<port>-<hash>/
      hub.json              what the client knows: federation, client id, preset, method,
                            the global version it holds, the last round it reported
      token                 the bearer token, mode 0600
      global.safetensors    the latest global weights it downloaded (all segments it has)
      personal.safetensors  its personal segments (ulatdec, udec): they never leave this folder
      downloads/            verified downloads and `.part` files of cut-off ones (resumed)
      rounds/r0003-<ver>/   one round in progress: round.json, epoch-001.safetensors, ...,
                            upload.safetensors (the delta, kept until the hub accepts it)
      samples/              sample grids made by the terminal app
      .lock                 held by the process that works on this hub
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from feddiffuse.shared.wire import (
    atomic_write_bytes,
    load_weights,
    read_metadata_value,
    save_weights,
)

from .errors import HubLocked
from .settings import client_home

try:  # POSIX advisory locks; Windows runs without the single-process guard
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

TOKEN_MODE = 0o600
DIR_MODE = 0o700


class HubInfo(BaseModel):
    """What the client remembers about a hub (hub.json)."""

    model_config = ConfigDict(extra="ignore")

    url: str
    federation: str | None = None
    client_id: str | None = None
    preset: str | None = None
    method: str | None = None
    rounds: int | None = None
    global_version: str | None = None  # the version of global.safetensors
    global_round: int | None = None  # the round whose manifest named that version
    last_reported_round: int | None = None
    last_receipt_sha256: str | None = None
    finished: bool = False
    sample_version: str | None = None  # the version of sample.safetensors (the hub's EMA)
    sample_round: int | None = None  # rounds completed when that model was made
    ca_cert: str | None = None  # a CA certificate file to trust for this hub (--ca-cert)
    joined_at: str | None = None
    updated_at: str | None = None


@dataclass
class HeldGlobal:
    tensors: dict[str, torch.Tensor]
    version: str | None  # the newest version any segment came from
    segment_versions: dict[str, str]  # segment -> the global version it was downloaded at


def hub_slug(url: str) -> str:
    """A folder name for a hub URL: readable host and port plus a short hash of the whole URL."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9]+", "-", url.split("://", 1)[-1]).strip("-")[:40]
    return f"{readable}-{digest}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_png_path(folder: Path, prefix: str, now: float | None = None) -> Path:
    """A PNG path `<prefix>-<local time>.png` in `folder` that no earlier file has (a sample
    grid, an audit's pairs)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = folder / f"{prefix}-{stamp}.png"
    n = 2
    while path.exists():
        path = folder / f"{prefix}-{stamp}-{n}.png"
        n += 1
    return path


def known_hubs(home: Path | None = None) -> list[HubInfo]:
    """Every hub this machine has joined (holds a token for), most recently used first."""
    root = (home or client_home()) / "hubs"
    found: list[HubInfo] = []
    for folder in sorted(root.glob("*/hub.json")) if root.is_dir() else []:
        try:
            info = HubInfo.model_validate_json(folder.read_bytes())
        except (OSError, ValueError):
            continue
        if (folder.parent / "token").is_file():
            found.append(info)
    found.sort(key=lambda i: i.updated_at or i.joined_at or "", reverse=True)
    return found


class HubFolder:
    """The client's state folder for one hub (the hub's own database interface is
    feddiffuse.hub.store.HubStore). Creating the object writes nothing."""

    def __init__(self, url: str, home: Path | None = None) -> None:
        self.url = url
        self.root = (home or client_home()) / "hubs" / hub_slug(url)

    # -- paths ------------------------------------------------------------------------------

    @property
    def info_path(self) -> Path:
        return self.root / "hub.json"

    @property
    def token_path(self) -> Path:
        return self.root / "token"

    @property
    def global_path(self) -> Path:
        return self.root / "global.safetensors"

    @property
    def personal_path(self) -> Path:
        return self.root / "personal.safetensors"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def rounds_dir(self) -> Path:
        return self.root / "rounds"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def log_path(self) -> Path:
        """The client's log for this hub: every run's events, appended (see console.FileLog)."""
        return self.root / "client.log"

    def exists(self) -> bool:
        return self.info_path.is_file()

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    # -- lock ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Hold this hub's folder; HubLocked if another holder keeps it for `wait_s` seconds."""
        self.ensure()
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.root / ".lock", "a+", encoding="utf-8") as f:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise HubLocked(f"Another feddiffuse-client (pid {holder}) is already "
                                    f"working for {self.url}; stop it first.") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- token --------------------------------------------------------------------------------

    def read_token(self) -> str | None:
        try:
            return self.token_path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def write_token(self, token: str) -> None:
        """Write the token readable by its owner only (mode 0600, also on overwrite)."""
        self.ensure()
        tmp = self.root / ".token.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, TOKEN_MODE)
        try:
            os.fchmod(fd, TOKEN_MODE)
            os.write(fd, token.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.token_path)

    # -- hub.json -----------------------------------------------------------------------------

    def load_info(self) -> HubInfo:
        try:
            return HubInfo.model_validate(json.loads(self.info_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError):
            return HubInfo(url=self.url)

    def save_info(self, info: HubInfo) -> None:
        self.ensure()
        info = info.model_copy(update={"updated_at": _now(),
                                       "joined_at": info.joined_at or _now()})
        atomic_write_bytes(self.info_path, info.model_dump_json(indent=2).encode("utf-8"))

    def update_info(self, **changes: object) -> HubInfo:
        info = self.load_info().model_copy(update=changes)
        self.save_info(info)
        return info

    # -- weights ------------------------------------------------------------------------------

    def load_global(self) -> HeldGlobal:
        """The global weights held locally, with the version each segment came from."""
        if not self.global_path.is_file():
            return HeldGlobal({}, None, {})
        tensors, meta = load_weights(self.global_path)
        try:
            versions = json.loads(read_metadata_value(meta, "segment_versions") or "{}")
        except ValueError:
            versions = {}
        return HeldGlobal(tensors, read_metadata_value(meta, "version"), dict(versions))

    def merge_global(self, tensors: Mapping[str, torch.Tensor], segments: tuple[str, ...],
                     version: str, preset: str, round_index: int) -> HeldGlobal:
        """Fold downloaded `segments` of global `version` into global.safetensors."""
        held = self.load_global()
        merged = {**held.tensors, **tensors}
        versions = {**held.segment_versions, **dict.fromkeys(segments, version)}
        save_weights(self.global_path, merged, {
            "kind": "global", "preset": preset, "version": version, "round": round_index,
            "segments": ",".join(sorted(versions)), "segment_versions": json.dumps(versions)})
        return HeldGlobal(merged, version, versions)

    @property
    def sample_path(self) -> Path:
        return self.root / "sample.safetensors"

    @property
    def personal_ema_path(self) -> Path:
        return self.root / "personal-ema.safetensors"

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
        """A weights file kept here and the round its metadata names; ({}, None) if absent."""
        if not path.is_file():
            return {}, None
        tensors, meta = load_weights(path)
        saved = read_metadata_value(meta, "round")
        return tensors, None if saved is None else int(saved)

    def load_sample_model(self) -> dict[str, torch.Tensor]:
        """The hub's EMA of the global model, when one was fetched."""
        return self._read(self.sample_path)[0]

    def save_sample_model(self, tensors: Mapping[str, torch.Tensor], version: str,
                          preset: str, round_index: int) -> None:
        save_weights(self.sample_path, tensors, {"kind": "global-ema", "preset": preset,
                                                 "version": version, "round": round_index})
        self.update_info(sample_version=version, sample_round=round_index)

    def load_personal_ema(self) -> tuple[dict[str, torch.Tensor], int | None]:
        """The EMA of this client's personal segments, and the last round it took in."""
        return self._read(self.personal_ema_path)

    def save_personal_ema(self, tensors: Mapping[str, torch.Tensor], preset: str,
                          round_index: int) -> None:
        save_weights(self.personal_ema_path, tensors, {"kind": "personal-ema",
                                                       "preset": preset, "round": round_index})

    @property
    def residual_path(self) -> Path:
        """Error feedback: what this client's lossy uploads have not sent yet."""
        return self.root / "residual.safetensors"

    def load_residual(self) -> dict[str, torch.Tensor]:
        return self._read(self.residual_path)[0]

    def commit_residual(self, round_dir: Path) -> None:
        """Make the residual left by the upload of `round_dir` the one the next round adds
        (once the hub holds that upload; a refused one leaves the older residual)."""
        path = round_dir / "residual.safetensors"
        if path.is_file():
            os.replace(path, self.residual_path)

    @property
    def optimizer_path(self) -> Path:
        return self.root / "optimizer.safetensors"

    def load_optimizer(self, before_round: int) -> dict[str, torch.Tensor]:
        """The optimiser state saved after an earlier round than `before_round`, or {}."""
        tensors, saved = self._read(self.optimizer_path)
        return tensors if saved is not None and saved < before_round else {}

    def save_optimizer(self, tensors: Mapping[str, torch.Tensor], preset: str,
                       round_index: int) -> None:
        save_weights(self.optimizer_path, tensors, {"kind": "optimizer", "preset": preset,
                                                    "round": round_index})

    def load_personal(self) -> dict[str, torch.Tensor]:
        return self._read(self.personal_path)[0]

    def save_personal(self, tensors: Mapping[str, torch.Tensor], preset: str, round_index: int,
                      segments: tuple[str, ...]) -> None:
        save_weights(self.personal_path, tensors, {"kind": "personal", "preset": preset,
                                                   "round": round_index,
                                                   "segments": ",".join(segments)})

    def forget_weights(self) -> None:
        """Move the weights and rounds of a previous federation to `previous/` (not deleted)."""
        previous = self.root / "previous" / _now().replace(":", "")
        previous.mkdir(parents=True, exist_ok=True)
        for path in (self.global_path, self.personal_path, self.rounds_dir, self.sample_path,
                     self.personal_ema_path, self.optimizer_path, self.residual_path):
            if path.exists():
                os.replace(path, previous / path.name)
        self.clear_downloads()
        self.update_info(global_version=None, global_round=None, last_reported_round=None,
                         last_receipt_sha256=None, finished=False, sample_version=None,
                         sample_round=None)

    # -- downloads ----------------------------------------------------------------------------

    def download_path(self, version: str, segments: tuple[str, ...] | list[str],
                      base: str | None = None) -> Path:
        since = f"-from-{base[:16]}" if base is not None else ""
        return self.downloads_dir / f"{version[:16]}-{'+'.join(segments)}{since}.safetensors"

    def clear_downloads(self, keep: Path | None = None) -> None:
        if not self.downloads_dir.is_dir():
            return
        for p in self.downloads_dir.iterdir():
            if keep is not None and p.name.startswith(keep.name):
                continue
            with contextlib.suppress(OSError):
                p.unlink()

    # -- rounds in progress -------------------------------------------------------------------

    def round_dir(self, round_index: int, version: str) -> Path:
        return self.rounds_dir / f"r{round_index:04d}-{version[:12]}"

    @staticmethod
    def checkpoint_path(round_dir: Path, epoch: int) -> Path:
        return round_dir / f"epoch-{epoch:03d}.safetensors"

    @staticmethod
    def latest_checkpoint(round_dir: Path) -> tuple[int, Path] | None:
        """(epochs finished, path) of the newest epoch checkpoint in `round_dir`, if any."""
        best: tuple[int, Path] | None = None
        if not round_dir.is_dir():
            return None
        for p in round_dir.glob("epoch-*.safetensors"):
            m = re.fullmatch(r"epoch-(\d+)\.safetensors", p.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
        return best

    def clear_checkpoints(self, round_dir: Path, keep: int) -> None:
        """Delete the epoch checkpoints of `round_dir` older than epoch `keep`."""
        for p in round_dir.glob("epoch-*.safetensors"):
            m = re.fullmatch(r"epoch-(\d+)\.safetensors", p.name)
            if m and int(m.group(1)) < keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    def rounds_in_progress(self) -> list[Path]:
        if not self.rounds_dir.is_dir():
            return []
        return sorted(p for p in self.rounds_dir.iterdir() if p.is_dir())

    def clear_rounds(self, keep: Path | None = None) -> None:
        """Delete the folders of rounds other than `keep` (finished or abandoned)."""
        for p in self.rounds_in_progress():
            if keep is None or p != keep:
                shutil.rmtree(p, ignore_errors=True)
