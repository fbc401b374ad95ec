"""Sampling from the client's current model: the global weights plus its personal segments."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from feddiffuse.shared.diffusion import DiffusionSchedule, SamplerSpec, make_generator, sample
from feddiffuse.shared.images import save_grid
from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.model import build_unet, segment_map

from .errors import Cancelled, SetupError
from .participant import describe_device
from .state import HubFolder


@dataclass
class SampleResult:
    path: Path
    images: torch.Tensor  # float in [-1, 1], N x C x H x W
    description: str
    note: str | None = None  # what to expect from an early model's samples


def rounds_completed(info) -> int | None:
    """How many rounds of training the model this client would sample from has seen."""
    if info.sample_version is not None and info.sample_round is not None:
        return info.sample_round
    if info.global_round is None:
        return None
    return info.rounds if info.finished and info.rounds else info.global_round - 1


def maturity_note(done: int | None, rounds: int | None) -> str | None:
    """A sentence on what to expect from samples of a model that is still early, or None.

    From the demo (8 rounds, the default recipe): fd_fmnist 59 after round 2, 76 after round 4,
    35 after round 6 and 37 after round 8, since the learning rate decays over the whole
    federation; the images sharpen most in the last quarter of the rounds.
    """
    if done is None or not rounds or done >= rounds:
        return None
    if done == 0:
        return ("This is the initial, untrained model: its samples are pure noise until the "
                "first round is aggregated.")
    return (f"This model has finished {done} of {rounds} rounds, so samples are still noisy "
            "at this stage: with the default recipe they sharpen most in the last quarter of "
            "the rounds, as the learning rate decays (sample again when the federation has "
            "finished).")


def current_model(store: HubFolder) -> tuple[torch.nn.Module, str]:
    """The UNet with the client's current weights, and a line that says what they are."""
    info = store.load_info()
    held = store.load_global()
    if not held.tensors or info.preset is None:
        raise SetupError(f"There is no model for {store.url} yet; join the federation first "
                         "(feddiffuse-client join).")
    model = build_unet(info.preset)
    seg_of = segment_map(model)
    personal_segs = personal_segments(info.method) if info.method else ()
    ema = store.load_sample_model()
    own = store.load_personal_ema()[0] if ema else {}
    own = own or store.load_personal()
    personal = {n: t for n, t in own.items() if seg_of.get(n) in personal_segs}
    weights = {**(ema or held.tensors), **personal}
    missing = set(seg_of) - set(weights)
    if missing:
        raise SetupError(f"The model kept for {store.url} is incomplete ({len(missing)} tensors "
                         "missing); run feddiffuse-client join to fetch it again.")
    model.load_state_dict(weights, strict=True)
    if ema:
        what = (f"EMA of the global model after round {info.sample_round} "
                f"({(info.sample_version or '?')[:12]})")
    else:
        what = f"global model {held.version[:12] if held.version else '?'}"
        done = rounds_completed(info)
        if done is not None:
            what += f" after {done} round(s)"
    if personal:
        what += f" with this client's own {', '.join(personal_segs)}"
    return model, what


def sample_grid(store: HubFolder, n: int, steps: int, out: Path, *, device: str = "auto",
                seed: int = 0, on_step=None, stop: threading.Event | None = None,
                sampler: str = "ddim", clip_x0: bool | None = None) -> SampleResult:
    """Sample `n` images in `steps` steps and write them as a PNG grid to `out`.

    `sampler` "ddim" (the default; x0 clipped unless `clip_x0` is False) or "ddpm"
    (ancestral, as the paper sampled: 1,000 steps, no clipping unless `clip_x0` is True).
    """
    if n < 1:
        raise SetupError("The number of images must be at least 1.")
    if steps < 1:
        raise SetupError("The number of sampling steps must be at least 1.")
    spec = SamplerSpec(sampler, steps, clip_x0).validate()
    model, what = current_model(store)
    dev, _reason = describe_device(device)
    model.to(dev)

    def step(i: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled("sampling stopped")
        if on_step is not None:
            on_step(i, total)

    images = sample(model, DiffusionSchedule.linear().to(dev), n, make_generator(seed, dev),
                    spec.name, steps=spec.steps, device=dev, on_step=step, clip_x0=spec.clips)
    path = save_grid(images, out)
    info = store.load_info()
    return SampleResult(path, images, f"{n} samples from the {what}, {spec.describe()}",
                        maturity_note(rounds_completed(info), info.rounds))
