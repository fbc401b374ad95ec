"""The participant loop: fetch the manifest, download, train, upload, wait; again.

This module talks to the hub and decides what to do next; the round's own work (checkpoints,
resume, the round record, the delta) is `round_work.RoundWork`.

One round, as the hub's manifest describes it:

1. download the segments it names (and any the client lacks), verify and merge them into the
   local copy of the global model, and lay the personal segments kept on disk over them;
2. train the local epochs on the user's images with `feddiffuse.shared.training.train_local`,
   writing a checkpoint after every epoch (a restart resumes from the newest one);
3. compute `local - global` for the upload segments only, keep it on disk, upload it, and
   keep the personal segments (ulatdec, udec) on disk, never on the network.

Network faults are retried with backoff (see `backoff`); a 409 means the round moved on and
the loop asks for the current manifest again. Everything is reported through `events`.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from feddiffuse.shared.codecs import CodecError, decode_payload, parse_codec, payload_codec
from feddiffuse.shared.data import load_image_folder
from feddiffuse.shared.diffusion import DiffusionSchedule
from feddiffuse.shared.errors import DataNotFoundError, UserError, WireFormatError
from feddiffuse.shared.model import SEGMENTS, build_unet, get_preset, segment_map
from feddiffuse.shared.payloads import apply_update
from feddiffuse.shared.protocol import Manifest, RoundPhase
from feddiffuse.shared.recipes import Recipe, recipe_from_training
from feddiffuse.shared.training import select_device
from feddiffuse.shared.wire import read_header, read_metadata_value

from . import events as ev
from .backoff import Backoff, call_with_retry
from .console import FileLog
from .errors import (
    Cancelled,
    DownloadCorrupt,
    FederationFinished,
    RoundMovedOn,
    SetupError,
)
from .hub_client import HubClient
from .inputs import scan_image_folder
from .round_work import (
    CRASH_AFTER_EPOCH_ENV,
    PAUSE_AFTER_EPOCH_ENV,
    PROGRESS_INTERVAL_S,
    RoundWork,
    saved_work_matches,
)
from .state import HubFolder

LONG_POLL_S = 5.0  # the longest a waiting client's manifest request is held by the hub

__all__ = ["CRASH_AFTER_EPOCH_ENV", "PAUSE_AFTER_EPOCH_ENV", "Participant", "ParticipantOptions",
           "RunOutcome", "describe_device", "load_training_images"]


@dataclass
class ParticipantOptions:
    data_dir: Path
    device: str = "auto"
    once: bool = False
    # After taking part in the last round, stay until the final model is published and fetch
    # it, even with `once`. Only tests that drive several clients one after another in one
    # thread turn it off (the others' uploads cannot come while this one waits).
    await_final: bool = True
    backoff: Backoff = field(default_factory=Backoff)
    poll_s: float = 5.0  # how often to ask for a new round when the hub gives no hint
    poll_max_s: float = 60.0


@dataclass
class RunOutcome:
    rounds_done: list[int] = field(default_factory=list)
    finished: bool = False  # the federation is over


def describe_device(choice: str) -> tuple[torch.device, str]:
    """select_device, with a word on the CPU fallback that MPS gets."""
    device, reason = select_device(choice)
    if device.type == "mps":
        reason += "; operators MPS lacks run on the CPU"
    return device, reason


def load_training_images(data_dir: Path, preset_name: str) -> torch.Tensor:
    """The user's images at the preset's size, as one uint8 tensor (SetupError if none)."""
    cfg = get_preset(preset_name).config
    try:
        return load_image_folder(data_dir, cfg.image_size, cfg.channels).images
    except DataNotFoundError:
        raise SetupError(f"No usable images found in {data_dir}; choose a folder that holds "
                         "your images (PNG, JPEG, BMP, GIF, TIFF, WebP, ...).") from None
    except UserError as exc:
        raise SetupError(str(exc).replace("--dataset", "--data")) from None


class Participant:
    """Takes part in a federation until it finishes (or for one round with `once`)."""

    def __init__(self, hub: HubClient, store: HubFolder, options: ParticipantOptions,
                 emit: ev.Emit = ev.ignore, stop: threading.Event | None = None) -> None:
        self.hub = hub
        self.store = store
        self.options = options
        self._log = FileLog(store.log_path)

        def emit_and_log(event: ev.Event) -> None:
            self._log(event)
            emit(event)

        self.emit = emit_and_log
        self.stop = stop or threading.Event()
        self._images: dict[str, torch.Tensor] = {}
        self._device: torch.device | None = None
        self._last_manifest: Manifest | None = None
        self._schedule = DiffusionSchedule.linear()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        try:
            return self._run()
        finally:
            self._log.close()

    def _run(self) -> RunOutcome:
        outcome = RunOutcome()
        device, reason = describe_device(self.options.device)
        self._device = device
        self.emit(ev.DeviceEvent(str(device), reason))
        refused: set[tuple[int, str]] = set()
        while True:
            self._check_stop()
            self.emit(ev.PhaseEvent("connecting", f"asking {self.hub.url} for the round"))
            try:
                manifest = self._retry("fetching the round manifest", self.hub.manifest)
            except FederationFinished:
                self.store.update_info(finished=True)
                self.emit(ev.PhaseEvent("finished", "the federation is finished"))
                outcome.finished = True
                return outcome
            self._remember(manifest)
            key = (manifest.round, manifest.global_version)
            if manifest.phase == RoundPhase.FINISHED:
                self._fetch_final(manifest)
                outcome.finished = True
                return outcome
            if manifest.phase == RoundPhase.OPEN and key not in refused:
                try:
                    self._play_round(manifest)
                except (RoundMovedOn, FederationFinished) as exc:
                    refused.add(key)
                    self.emit(ev.LogEvent(f"Round {manifest.round}: {exc}; rejoining the "
                                          "current round.", "warning"))
                    continue
                outcome.rounds_done.append(manifest.round)
                if self.options.once and not self._last_round(manifest):
                    return outcome
                continue
            if manifest.phase == RoundPhase.REPORTED and self._adopt_report(manifest):
                outcome.rounds_done.append(manifest.round)
                if self.options.once and not self._last_round(manifest):
                    return outcome
                continue
            self._wait_for_next_round(manifest)

    def _last_round(self, manifest: Manifest) -> bool:
        """Whether `manifest`'s round is the federation's last. A client that took part in it
        stays (even with `once`) until the hub publishes the final model, and fetches it, so
        that no federation ends with the client holding a model older than the final one."""
        if manifest.round < manifest.rounds or not self.options.await_final:
            return False
        self.emit(ev.LogEvent(f"Round {manifest.round} was the last one: waiting for the hub to "
                              "publish the final model."))
        return True

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled("stopped")

    def _retry(self, what: str, fn):
        def on_retry(what: str, attempt: int, delay: float, exc: Exception) -> None:
            self.emit(ev.RetryEvent(what, attempt, delay, str(exc)))
            self.emit(ev.PhaseEvent("retrying", f"{what}: {exc}; retrying in {delay:.0f} s"))

        return call_with_retry(fn, what=what, backoff=self.options.backoff, stop=self.stop,
                               on_retry=on_retry)

    def _remember(self, manifest: Manifest) -> None:
        previous = self._last_manifest
        self._last_manifest = manifest
        info = self.store.load_info()
        changes = {"federation": manifest.federation, "client_id": manifest.client_id,
                   "preset": manifest.preset, "method": manifest.method,
                   "rounds": manifest.rounds}
        if info.global_version is not None and any(
                getattr(info, k) not in (None, changes[k]) for k in ("federation", "preset",
                                                                     "method", "client_id")):
            # A new federation behind the same URL: what we hold belongs to the old one.
            self.store.forget_weights()
            self.emit(ev.LogEvent(f"The hub now runs federation {manifest.federation} "
                                  f"({manifest.method}, {manifest.preset}); the weights kept "
                                  "for the previous one were set aside.", "warning"))
            info = self.store.load_info()
        if any(getattr(info, k) != v for k, v in changes.items()):
            self.store.update_info(**changes)
        if previous is None or (previous.round, previous.phase, previous.global_version) != (
                manifest.round, manifest.phase, manifest.global_version):
            self.emit(ev.RoundEvent(manifest))

    def _wait_for_next_round(self, manifest: Manifest) -> None:
        hint = manifest.retry_after_s
        delay = self.options.poll_s if hint is None else hint
        delay = min(max(delay, 0.05), self.options.poll_max_s)
        if manifest.phase == RoundPhase.REPORTED:
            detail = f"round {manifest.round} reported; waiting for the other participants"
        elif manifest.phase == RoundPhase.WAITING:
            detail = f"not part of round {manifest.round}; waiting for the next round"
        else:
            detail = f"round {manifest.round} already tried; waiting for the next round"
        self.emit(ev.PhaseEvent("waiting", detail))
        # A long poll: the hub answers as soon as the next round opens, so a round starts
        # without waiting out the poll interval. Windows of at most LONG_POLL_S keep a Cancel
        # prompt; a hub that answers at once (an older one) is asked again only after `delay`.
        started = time.monotonic()
        window = min(delay, LONG_POLL_S)
        try:
            fresh = self.hub.manifest(wait=window)
        except Exception:  # noqa: BLE001 - the loop's next manifest call retries and reports
            fresh = None
        if fresh is not None and (fresh.round, fresh.phase, fresh.global_version) != (
                manifest.round, manifest.phase, manifest.global_version):
            return
        left = delay - (time.monotonic() - started)
        if self.stop.wait(max(left, 0.0)) or self.stop.is_set():
            raise Cancelled("stopped while waiting")

    # -- one round ----------------------------------------------------------------------------

    def _play_round(self, manifest: Manifest) -> None:
        r, version = manifest.round, manifest.global_version
        round_dir = self.store.round_dir(r, version)
        self.store.clear_rounds(keep=round_dir)
        upload_path = round_dir / "upload.safetensors"
        if not saved_work_matches(round_dir, manifest):
            self.store.clear_rounds()
        if not upload_path.is_file():
            self._train_round(manifest, round_dir, upload_path)
        body = upload_path.read_bytes()
        segments = tuple(manifest.upload_segments)
        self.emit(ev.PhaseEvent("uploading", f"round {r}: uploading {', '.join(segments)} "
                                f"({len(body) / 1e6:.2f} MB)"))
        progress = self._progress("upload")
        receipt = self._retry(
            f"uploading the round {r} update",
            lambda: self.hub.upload_update(r, body, on_progress=progress))
        self.store.update_info(last_reported_round=r, last_receipt_sha256=receipt.sha256)
        self.store.commit_residual(round_dir)
        self.store.clear_rounds()
        self.emit(ev.UploadedEvent(r, segments, receipt))
        self.emit(ev.LogEvent(f"Round {r}: uploaded {', '.join(segments)} "
                              f"({receipt.bytes / 1e6:.2f} MB, {receipt.num_samples} images)."))

    def _adopt_report(self, manifest: Manifest) -> bool:
        """The hub holds our upload although we saw no receipt (the answer was lost)."""
        round_dir = self.store.round_dir(manifest.round, manifest.global_version)
        if not (round_dir / "upload.safetensors").is_file():
            return False
        self.store.update_info(last_reported_round=manifest.round)
        self.store.commit_residual(round_dir)
        self.store.clear_rounds()
        self.emit(ev.LogEvent(f"Round {manifest.round}: the hub already has this client's "
                              "update (its receipt was lost on the way)."))
        return True

    def _train_round(self, manifest: Manifest, round_dir: Path, upload_path: Path) -> None:
        images = self._training_images(manifest.preset)
        held = self._ensure_global(manifest, segment_map(build_unet(manifest.preset)))
        RoundWork(self.store, manifest, self._recipe(manifest), round_dir, self.emit, self.stop,
                  self._device or "cpu", self._schedule, self._progress).run(
            images, held, upload_path)

    def _recipe(self, manifest: Manifest) -> Recipe:
        try:
            return recipe_from_training(manifest.training)
        except UserError as exc:
            raise SetupError(f"The hub asks for a training recipe this client does not know "
                             f"({exc}); upgrade feddiffuse-client.") from None

    def _training_images(self, preset: str) -> torch.Tensor:
        if preset not in self._images:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images = load_training_images(self.options.data_dir, preset)
            for w in caught:
                self.emit(ev.LogEvent(str(w.message), "warning"))
            self._images = {preset: images}
            self.emit(ev.LogEvent(f"Loaded {images.shape[0]} images from "
                                  f"{self.options.data_dir} at {images.shape[-1]}x"
                                  f"{images.shape[-2]}x{images.shape[1]}."))
            cfg = get_preset(preset).config
            scan = scan_image_folder(self.options.data_dir)
            for why, n in sorted(scan.skipped.items()):
                self.emit(ev.LogEvent(f"Not used: {n} image file(s) in {why}."))
            for line in scan.conversion_notes(cfg.image_size, cfg.channels):
                self.emit(ev.LogEvent(line))
        return self._images[preset]

    # -- downloads ----------------------------------------------------------------------------

    def _ensure_global(self, manifest: Manifest, seg_of: dict[str, str]
                       ) -> dict[str, torch.Tensor]:
        """The global weights at the manifest's version for every segment it asks us to take,
        downloading only what is missing locally."""
        version = manifest.global_version
        held = self.store.load_global()
        personal_names = set(self.store.load_personal())
        names_of = {s: [n for n, g in seg_of.items() if g == s] for s in SEGMENTS}

        def have(segment: str, at_version: bool) -> bool:
            names = names_of[segment]
            if at_version and held.segment_versions.get(segment) != version:
                return False
            return all(n in held.tensors or (not at_version and n in personal_names)
                       for n in names)

        want = {s for s in manifest.download_segments if not have(s, at_version=True)}
        want |= {s for s in SEGMENTS if not have(s, at_version=False)}
        want |= {s for s in manifest.upload_segments if not have(s, at_version=True)}
        segments = tuple(s for s in SEGMENTS if s in want)
        final = manifest.phase == RoundPhase.FINISHED
        label = "The final model" if final else f"Round {manifest.round}"
        if not segments:
            self.emit(ev.LogEvent(f"{label}: the global model {version[:12]} is already "
                                  "here."))
            return held.tensors
        expected = {n: tuple(t.shape) for n, t in build_unet(manifest.preset).named_parameters()
                    if seg_of[n] in want}
        base = manifest.delta_base
        if base is not None and not all(held.segment_versions.get(s) == base
                                        and all(n in held.tensors for n in names_of[s])
                                        for s in segments):
            base = None  # this client lacks the version the update is from
        what = "the update" if base is not None else "global model"
        self.emit(ev.PhaseEvent("downloading", f"{label[0].lower()}{label[1:]}: downloading "
                                f"{', '.join(segments)} of {what} {version[:12]}"))
        tensors, dest = self._download_checked(version, segments, expected,
                                               f"downloading {what} {version[:12]}",
                                               manifest=manifest, base=base)
        if base is not None:  # the very addition the hub made: the same bytes on both sides
            tensors = apply_update(held.tensors, tensors)
        size = dest.stat().st_size
        merged = self.store.merge_global(tensors, segments, version, manifest.preset,
                                         manifest.round)
        self.store.update_info(global_version=version, global_round=manifest.round)
        self.store.clear_downloads()
        self.emit(ev.LogEvent(f"{label}: downloaded {', '.join(segments)} "
                              f"({size / 1e6:.2f} MB), verified."))
        return merged.tensors

    def _download_checked(self, version: str, segments: tuple[str, ...],
                          expected: dict[str, tuple[int, ...]], what: str,
                          manifest: Manifest | None = None, base: str | None = None
                          ) -> tuple[dict[str, torch.Tensor], Path]:
        """Download (resumably, with retries) and decode `segments` of `version` (with
        `base`: the update from it), checking the codec, names, shapes and the versions the
        file names; a corrupt file is deleted and fetched again. Returns the tensors and the
        file."""
        dest = self.store.download_path(version, segments, base)
        progress = self._progress("download")
        allowed = {"fp32"}
        if manifest is not None:
            try:
                downlink = parse_codec(manifest.downlink_codec)
            except CodecError:
                raise SetupError(f"The hub sends models in codec {manifest.downlink_codec!r}, "
                                 "which this client does not know; upgrade "
                                 "feddiffuse-client.") from None
            allowed = {downlink.name} if base is not None else {"fp32",
                                                                 downlink.dense_form.name}

        def fetch() -> dict[str, torch.Tensor]:
            if not dest.is_file():
                self.hub.download_model(version, segments, dest, on_progress=progress,
                                        should_stop=self.stop.is_set, base=base)
            try:
                data = dest.read_bytes()
                header, _ = read_header(data)
                declared = payload_codec(header.get("__metadata__") or {})
                if declared not in allowed:
                    raise WireFormatError(f"it is in codec {declared!r}, expected "
                                          f"{' or '.join(sorted(allowed))}")
                tensors, meta = decode_payload(data, parse_codec(declared), expected)
                if base is not None and read_metadata_value(meta, "base_version") != base:
                    raise WireFormatError("it is not the update from the version held here")
            except WireFormatError as exc:
                dest.unlink(missing_ok=True)
                raise DownloadCorrupt(f"the downloaded model is not valid ({exc})") from exc
            said = read_metadata_value(meta, "version")
            if said is not None and said != version:
                dest.unlink(missing_ok=True)
                raise DownloadCorrupt(f"the hub sent version {said[:12]} instead of "
                                      f"{version[:12]}")
            return tensors

        return self._retry(what, fetch), dest

    def _fetch_final(self, manifest: Manifest) -> None:
        seg_of = segment_map(build_unet(manifest.preset))
        self._ensure_global(manifest, seg_of)
        if manifest.sample_version is not None:
            self._ensure_sample_model(manifest)
        self.store.update_info(finished=True)
        # manifest.round: the last round, which is before `rounds` when a privacy budget
        # ended the federation early.
        self.emit(ev.PhaseEvent("finished", f"the federation {manifest.federation} finished "
                                f"after {manifest.round} rounds"))
        held = self.store.load_global().version or manifest.global_version
        self.emit(ev.LogEvent(f"The federation is finished and this client holds its final "
                              f"model ({held[:12]}, after round {manifest.round}): sample from "
                              "it with `feddiffuse-client sample`."))

    def _ensure_sample_model(self, manifest: Manifest) -> None:
        """Download the hub's EMA of the global model (the one to sample from), if new."""
        version = manifest.sample_version
        assert version is not None
        if self.store.load_info().sample_version == version and self.store.sample_path.is_file():
            return
        expected = {n: tuple(t.shape) for n, t in build_unet(manifest.preset).named_parameters()}
        self.emit(ev.PhaseEvent("downloading", f"downloading the model to sample from "
                                f"(the EMA {version[:12]})"))
        tensors, _dest = self._download_checked(version, SEGMENTS, expected,
                                                f"downloading the sampling model {version[:12]}")
        rounds_done = manifest.round if manifest.phase == RoundPhase.FINISHED \
            else manifest.round - 1
        self.store.save_sample_model(tensors, version, manifest.preset, rounds_done)
        self.store.clear_downloads()
        self.emit(ev.LogEvent(f"Downloaded the model to sample from (EMA of the global "
                              f"model after {rounds_done} round(s)), verified."))

    # -- progress -----------------------------------------------------------------------------

    def _progress(self, task: str):
        last = [0.0]

        def report(done: float, total: float | None) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or (total is not None and done >= total):
                last[0] = now
                self.emit(ev.ProgressEvent(task, done, total))

        return report
