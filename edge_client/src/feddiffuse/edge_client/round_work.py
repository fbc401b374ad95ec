"""One round's work on the client: train from the round's starting point, checkpoint after
every epoch, resume from the newest checkpoint, and write the update to upload.

The protocol loop (`participant`) decides which round to play and talks to the hub; this
module never does. What it keeps for a round lives in the round's folder
(`HubFolder.round_dir`): `round.json` (a `RoundRecord`: the assignment it was trained for and
each finished epoch), `epoch-NNN.safetensors` (the weights and Adam's state after that epoch)
and, at the end, `upload.safetensors` (the delta of the upload segments).
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from feddiffuse.shared.codecs import CodecError, compress_with_feedback, parse_codec, write_payload
from feddiffuse.shared.diffusion import DiffusionSchedule
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.model import build_unet, segment_map
from feddiffuse.shared.payloads import upload_metadata
from feddiffuse.shared.privacy.mechanism import privatize_upload
from feddiffuse.shared.protocol import Manifest
from feddiffuse.shared.recipes import Recipe, update_ema
from feddiffuse.shared.training import EpochReport, TrainConfig, train_local
from feddiffuse.shared.wire import atomic_write_bytes, load_weights, save_weights

from . import events as ev
from .errors import Cancelled, DownloadCorrupt, SetupError
from .state import HubFolder

# Test hook (documented in the README of the tests): exit the process at once, as a crash
# would, right after the checkpoint of this epoch is written.
CRASH_AFTER_EPOCH_ENV = "FEDDIFFUSE_TEST_CRASH_AFTER_EPOCH"
# Test hook: stop the process (SIGSTOP, once) at the same point, so a test can act while the
# client is surely mid-round (kill it, kill the hub) and then SIGCONT or kill it.
PAUSE_AFTER_EPOCH_ENV = "FEDDIFFUSE_TEST_PAUSE_AFTER_EPOCH"
PROGRESS_INTERVAL_S = 0.1
OPTIM_PREFIX = "optim."  # checkpoint tensors holding Adam's state, beside the weights

Progress = Callable[[float, float | None], None]


def assignment(manifest: Manifest) -> dict:
    """What a round's work was done for: a saved round is reused only for the same one."""
    return {"round": manifest.round, "global_version": manifest.global_version,
            "upload_segments": list(manifest.upload_segments),
            "training": manifest.training.model_dump()}


@dataclass
class EpochRecord:
    epoch: int
    mean_loss: float
    steps: int


@dataclass
class RoundRecord:
    """`round.json`: the assignment and the epochs finished so far."""

    assignment: dict
    epochs: list[EpochRecord] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RoundRecord | None:
        """The record in `path`, or None when there is none or it cannot be read."""
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            return cls(value["assignment"], [EpochRecord(int(e["epoch"]), float(e["mean_loss"]),
                                                         int(e["steps"]))
                                             for e in value["epochs"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(asdict(self)).encode())

    def matches(self, manifest: Manifest) -> bool:
        return self.assignment == assignment(manifest)

    def keep_until(self, epoch: int) -> None:
        self.epochs = [e for e in self.epochs if e.epoch <= epoch]

    def mean_loss(self) -> float | None:
        steps = sum(e.steps for e in self.epochs)
        if not steps:
            return None
        value = sum(e.mean_loss * e.steps for e in self.epochs) / steps
        return value if math.isfinite(value) else None


def saved_work_matches(round_dir: Path, manifest: Manifest) -> bool:
    """Whether the work in `round_dir` (if any) was done for this very assignment."""
    path = round_dir / "round.json"
    if not path.is_file():
        return True
    record = RoundRecord.load(path)
    return record is not None and record.matches(manifest)


@dataclass
class RoundWork:
    """Trains one round and writes its upload; resumable at every epoch boundary."""

    store: HubFolder
    manifest: Manifest
    recipe: Recipe
    round_dir: Path
    emit: ev.Emit
    stop: threading.Event
    device: torch.device | str
    schedule: DiffusionSchedule
    progress: Callable[[str], Progress]

    @property
    def record_path(self) -> Path:
        return self.round_dir / "round.json"

    def run(self, images: torch.Tensor, held: dict[str, torch.Tensor], upload_path: Path
            ) -> None:
        """Train on `images` from `held` (the round's global weights) and write the delta of
        the upload segments to `upload_path`."""
        m = self.manifest
        r = m.round
        model = build_unet(m.preset)
        seg_of = segment_map(model)
        personal_segs = personal_segments(m.method)
        config = self.recipe.train_config(epochs=m.training.local_epochs,
                                          images=int(images.shape[0]), round_index=r,
                                          rounds=m.rounds, batch_size=m.training.batch_size)
        record = RoundRecord.load(self.record_path) or RoundRecord(assignment(m))
        start_epoch, optimizer_state = self._start(model, record, config, held, seg_of,
                                                   personal_segs)
        if start_epoch < config.epochs:
            self._train(model, images, config, record, start_epoch, optimizer_state)
        trained = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        self._keep_local_state(trained, seg_of, personal_segs)
        upload = set(m.upload_segments)
        delta = {n: trained[n] - held[n] for n in seg_of if seg_of[n] in upload}
        num_samples, mean_loss = int(images.shape[0]), record.mean_loss()
        privacy = m.privacy.settings if m.privacy is not None else None
        privacy_note = None
        if privacy is not None:  # clip (local DP: and noise) before any encoding
            private = privatize_upload(delta, privacy)
            delta = private.tensors
            self.emit(ev.LogEvent(f"Round {r}: {private.describe(privacy)}."))
            if privacy.mode == "local":  # nothing un-noised about the data leaves
                num_samples, mean_loss = 1, None
            privacy_note = (f"{privacy.mode} clip={privacy.clip:g} noise_std="
                            f"{private.noise_std:g} noise={privacy.noise}")
        meta = upload_metadata(m.preset, r, m.global_version, num_samples,
                               ",".join(m.upload_segments), mean_loss)
        if privacy_note is not None:
            meta["privacy"] = privacy_note
        self._write_upload(delta, meta, upload_path)

    def _write_upload(self, delta: dict[str, torch.Tensor], meta: dict[str, object],
                      upload_path: Path) -> None:
        """Encode the update in the uplink codec, adding what earlier lossy uploads left out
        (error feedback). The residual this upload leaves is kept in the round's folder until
        the hub holds the upload (`HubFolder.commit_residual`), so a round redone after a
        crash starts from the same residual and uploads the same bytes."""
        try:
            codec = parse_codec(self.manifest.uplink_codec)
        except CodecError:
            raise SetupError(f"The hub asks for uplink codec {self.manifest.uplink_codec!r}, "
                             "which this client does not know; upgrade "
                             "feddiffuse-client.") from None
        residual = self.store.load_residual()
        wire, left = compress_with_feedback(delta, residual, codec)
        if left:
            save_weights(self.round_dir / "residual.safetensors", {**residual, **left}, {
                "kind": "residual", "preset": self.manifest.preset,
                "round": self.manifest.round})
        buffer = io.BytesIO()
        write_payload(buffer, wire, meta, codec)
        atomic_write_bytes(upload_path, buffer.getvalue())

    # -- where training starts ----------------------------------------------------------------

    def _start(self, model: torch.nn.Module, record: RoundRecord, config: TrainConfig,
               held: dict[str, torch.Tensor], seg_of: dict[str, str],
               personal_segs: tuple[str, ...]) -> tuple[int, dict[str, torch.Tensor]]:
        """Load the newest checkpoint, or the round's starting point; returns the first epoch
        still to train and the optimiser state to train it with."""
        r = self.manifest.round
        checkpoint = self.store.latest_checkpoint(self.round_dir)
        if checkpoint is not None:
            tensors, _ = load_weights(checkpoint[1])
            optimizer_state = {n[len(OPTIM_PREFIX):]: t for n, t in tensors.items()
                               if n.startswith(OPTIM_PREFIX)}
            model.load_state_dict({n: t for n, t in tensors.items()
                                   if not n.startswith(OPTIM_PREFIX)}, strict=True)
            start_epoch = min(checkpoint[0], config.epochs)
            record.keep_until(start_epoch)
            self.emit(ev.LogEvent(f"Round {r}: resuming from the checkpoint of epoch "
                                  f"{start_epoch}/{config.epochs}."))
            return start_epoch, optimizer_state
        personal = self.store.load_personal()
        start = {**held, **{n: t for n, t in personal.items() if seg_of.get(n) in personal_segs}}
        missing = set(seg_of) - set(start)
        if missing:
            raise DownloadCorrupt(f"{len(missing)} tensors of the model are missing after the "
                                  "download")
        model.load_state_dict(start, strict=True)
        optimizer_state = {}
        if self.recipe.keep_optimizer:
            optimizer_state = self.store.load_optimizer(before_round=r)
            if optimizer_state:
                self.emit(ev.LogEvent(f"Round {r}: continuing with the optimiser state of "
                                      "this client's previous round."))
        self.round_dir.mkdir(parents=True, exist_ok=True)
        record.save(self.record_path)
        return 0, optimizer_state

    # -- what stays on this machine -----------------------------------------------------------

    def _keep_local_state(self, trained: dict[str, torch.Tensor], seg_of: dict[str, str],
                          personal_segs: tuple[str, ...]) -> None:
        """The optimiser state for the next round, the personal segments and their EMA."""
        m = self.manifest
        if self.recipe.keep_optimizer:  # from the last epoch's checkpoint
            last = self.store.latest_checkpoint(self.round_dir)
            if last is not None:
                tensors, _ = load_weights(last[1])
                self.store.save_optimizer({n[len(OPTIM_PREFIX):]: t for n, t in tensors.items()
                                           if n.startswith(OPTIM_PREFIX)}, m.preset, m.round)
        if personal_segs:
            mine = {n: t for n, t in trained.items() if seg_of[n] in personal_segs}
            self.store.save_personal(mine, m.preset, m.round, personal_segs)
            if self.recipe.ema_decay is not None:
                self._update_personal_ema(mine, self.recipe.ema_decay)

    def _update_personal_ema(self, mine: dict[str, torch.Tensor], decay: float) -> None:
        """Advance the EMA of this client's personal segments by this round, once (a round
        replayed after a crash does not advance it twice)."""
        r = self.manifest.round
        previous, done = self.store.load_personal_ema()
        if done is not None and done >= r:
            return
        self.store.save_personal_ema(update_ema(previous or None, mine, decay),
                                     self.manifest.preset, r)

    # -- the epochs ---------------------------------------------------------------------------

    def _train(self, model: torch.nn.Module, images: torch.Tensor, config: TrainConfig,
               record: RoundRecord, start_epoch: int,
               optimizer_state: dict[str, torch.Tensor]) -> None:
        m = self.manifest
        r = m.round
        epochs = config.epochs
        steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
        total_steps = epochs * steps_per_epoch
        self.emit(ev.PhaseEvent("training", f"round {r}: training {epochs} local epoch(s) on "
                                f"{images.shape[0]} images ({self.device})"))
        progress = self.progress("train")
        current: dict[str, float] = {"epoch": start_epoch, "loss_sum": 0.0, "loss_n": 0,
                                     "last": 0.0}
        progress(start_epoch * steps_per_epoch, total_steps)

        def on_step(step: int, per_epoch: int, loss: float) -> None:
            current["loss_sum"] += loss
            current["loss_n"] += 1
            done = current["epoch"] * per_epoch + step
            now = time.monotonic()
            if now - current["last"] >= PROGRESS_INTERVAL_S or step == per_epoch:
                current["last"] = now
                self.emit(ev.LossEvent(int(current["epoch"]) + 1, step,
                                       current["loss_sum"] / current["loss_n"]))
                current["loss_sum"], current["loss_n"] = 0.0, 0
                progress(done, epochs * per_epoch)

        def on_epoch(report: EpochReport, trained: torch.nn.Module) -> None:
            tensors = {n: p.detach().to("cpu") for n, p in trained.named_parameters()}
            if report.optimizer_state is not None:  # so a resumed round is bit-identical
                tensors.update({OPTIM_PREFIX + n: t
                                for n, t in report.optimizer_state().items()})
            save_weights(self.store.checkpoint_path(self.round_dir, report.epoch), tensors, {
                "kind": "checkpoint", "preset": m.preset, "round": r,
                "base_version": m.global_version, "epoch": report.epoch})
            record.epochs.append(EpochRecord(report.epoch, report.mean_loss, report.steps))
            record.save(self.record_path)
            self.store.clear_checkpoints(self.round_dir, keep=report.epoch)
            current["epoch"] = report.epoch
            self.emit(ev.EpochEvent(report.epoch, epochs, report.mean_loss, report.seconds))
            self.emit(ev.LogEvent(f"Round {r}: epoch {report.epoch}/{epochs} loss "
                                  f"{report.mean_loss:.4f} "
                                  f"({report.images / max(report.seconds, 1e-9):.0f} img/s)."))
            _test_hooks_after_epoch(report.epoch)

        result = train_local(model, images, self.schedule, config, seed=m.training.seed,
                             device=self.device, start_epoch=start_epoch, on_step=on_step,
                             on_epoch=on_epoch, should_stop=self.stop.is_set,
                             optimizer_state=optimizer_state or None)
        if result.stopped:
            done = int(current["epoch"])
            raise Cancelled(f"training stopped; {done} of {epochs} epoch(s) of round {r} are "
                            "saved and the next start resumes from there")


_paused = False


def _test_hooks_after_epoch(epoch: int) -> None:
    global _paused
    target = os.environ.get(CRASH_AFTER_EPOCH_ENV)
    if target and target.isdigit() and int(target) == epoch:
        os._exit(75)
    target = os.environ.get(PAUSE_AFTER_EPOCH_ENV)
    if target and target.isdigit() and int(target) == epoch and not _paused:
        _paused = True
        os.kill(os.getpid(), signal.SIGSTOP)
