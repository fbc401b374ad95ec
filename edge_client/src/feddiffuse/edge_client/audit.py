"""The memorisation audit of the model this client holds, against the owner's own images.

Everything happens on this computer: the model is the one kept in the hub's state folder (the
global model plus this client's personal segments, as `sample` draws from), the images are
read from the owner's folder, and the report and the pairs picture are written under
`audits/` in that state folder (or where the user asks). Nothing is sent to the hub.
See feddiffuse.shared.evaluation.memorisation for the method.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from feddiffuse.shared.diffusion import DiffusionSchedule, SamplerSpec
from feddiffuse.shared.evaluation.memorisation import (
    K_RATIO,
    MIN_OWN_IMAGES,
    AuditResult,
    SpaceResult,
    TooFewImages,
    audit_model,
    choose_feature_space,
    describe_space,
    save_pairs,
)
from feddiffuse.shared.model import get_preset
from feddiffuse.shared.wire import atomic_write_bytes

from .errors import Cancelled, SetupError
from .inputs import check_image_folder
from .participant import describe_device, load_training_images
from .sampling import current_model
from .state import HubFolder, new_png_path

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ClientAudit:
    result: AuditResult
    pairs_path: Path
    report_path: Path
    model: str  # which model was audited, in words
    data_dir: Path

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "model": self.model, "data_dir": str(self.data_dir),
                "pairs_png": str(self.pairs_path), "report": str(self.report_path)}

    def lines(self) -> list[str]:
        """The report for people, one line each."""
        r = self.result
        out = [f"Audited the {self.model} against {r.own_images} of your images in "
               f"{self.data_dir}; nothing left this computer.",
               f"Samples: {r.samples} ({_sampler_words(r.sampler)}, seed {r.seed})."]
        for space in r.spaces.values():
            out.append(space_line(space, r.quantile))
        if r.feature_note:
            out.append(f"Feature space: none; {r.feature_note}.")
        out.append(r.verdict())
        out.append(f"Pairs: {self.pairs_path} (the {len(r.pairs)} closest samples, each beside "
                   "your image nearest to it; a red frame marks a near-copy).")
        return out


def space_line(space: SpaceResult, quantile: float) -> str:
    """One space's result in one sentence."""
    verdict = "FLAGGED" if space.flagged else "not flagged"
    name = describe_space(space.space)
    pct = f"{100 * quantile:.0f}th percentile"
    return (f"{name[0].upper()}{name[1:]}: {space.copies} of {space.samples} samples "
            f"({space.copy_rate:.0%}) are near-copies of one of your images (nearer to it "
            f"than {space.threshold:.4g}, and less than {space.ratio_threshold:.2f} of the "
            f"way to your {K_RATIO}th-nearest image: the {pct}s of your own images against "
            f"each other; {space.chance:.1%} of those pass by chance; p = "
            f"{space.p_value:.2g}): {verdict}.")


def _sampler_words(sampler: dict | None) -> str:
    if not sampler:
        return "sampler unknown"
    return SamplerSpec(sampler["name"], sampler["steps"], sampler["clip_x0"]).describe()


def audits_dir(store: HubFolder) -> Path:
    return store.root / "audits"


def load_own_images(data_dir: Path, preset: str) -> torch.Tensor:
    """The owner's images at the model's size (SetupError when the folder cannot be audited)."""
    scan = check_image_folder(data_dir)
    images = load_training_images(scan.path, preset)
    if images.shape[0] < MIN_OWN_IMAGES:
        raise SetupError(f"{scan.path} holds {images.shape[0]} usable image(s), too few to "
                         f"calibrate the audit; it needs at least {MIN_OWN_IMAGES}.")
    return images


def check_out_path(out: Path) -> None:
    """SetupError, before any work, when the pairs PNG could not be written at `out` (its
    folder is made here, as writing it would)."""
    if out.is_dir():
        raise SetupError(f"{out} is a folder; give --out a file name such as audit.png.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise SetupError(f"Cannot write {out} ({exc.strerror or exc}); choose another "
                         "--out.") from None


def run_audit(store: HubFolder, data_dir: Path | str, n: int = 64, *, steps: int = 50,
              seed: int = 0, device: str = "auto", out: Path | None = None,
              progress: Progress | None = None, stop: threading.Event | None = None
              ) -> ClientAudit:
    """Audit the model held for `store` against the images in `data_dir`.

    Writes the pairs PNG to `out` (default: a new file under `audits/`) and the JSON report
    beside it."""
    if n < 1:
        raise SetupError("The number of samples must be at least 1.")
    if steps < 1:
        raise SetupError("The number of sampling steps must be at least 1.")
    if out is not None:
        check_out_path(Path(out).expanduser())
    model, what = current_model(store)
    preset = store.load_info().preset
    assert preset is not None  # current_model checked it
    own = load_own_images(Path(data_dir).expanduser(), preset)
    cfg = get_preset(preset).config
    dev, _reason = describe_device(device)
    schedule = DiffusionSchedule.linear()  # the product's, as the model was trained with
    sampler = SamplerSpec("ddim", steps).validate(schedule.timesteps)
    features = choose_feature_space(cfg.channels, cfg.image_size, dev)

    def report(stage: str, done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled("the audit stopped")
        if progress is not None:
            progress(stage, done, total)

    try:
        result, samples = audit_model(model, own, n, sampler=sampler, seed=seed, device=dev,
                                      schedule=schedule, features=features, progress=report)
    except TooFewImages as exc:
        raise SetupError(str(exc)) from None
    pairs_path = (Path(out).expanduser() if out is not None
                  else new_png_path(audits_dir(store), "audit"))
    audit = ClientAudit(result, pairs_path, pairs_path.with_suffix(".json"), what,
                        Path(data_dir).expanduser().resolve())
    try:
        save_pairs(result, samples, own, pairs_path)
        atomic_write_bytes(audit.report_path,
                           json.dumps(audit.to_dict(), indent=2).encode("utf-8"))
    except OSError as exc:
        raise SetupError(f"Cannot write {exc.filename or pairs_path} "
                         f"({exc.strerror or exc}); choose another --out.") from None
    return audit


def feature_space_words(result: AuditResult) -> str:
    if result.feature_space is None:
        return f"none ({result.feature_note})" if result.feature_note else "none"
    return result.spaces[result.feature_space].description


__all__ = ["ClientAudit", "audits_dir", "feature_space_words", "run_audit", "space_line"]
