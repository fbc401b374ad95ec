"""The local training loop, used by the simulator and by the edge client.

Adam (lr 1e-4 by default, a fresh optimiser each round), batch 128, E local epochs over a
preloaded uint8 image tensor. Randomness is derived from (seed, epoch), so a run resumed from
an epoch checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .data.dataset import to_model_range
from .diffusion import DiffusionSchedule, diffusion_loss, make_generator
from .errors import UserError
from .recipes import check_choices

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def select_device(choice: str = "auto") -> tuple[torch.device, str]:
    """Pick the training device: CUDA > Apple MPS > CPU. Returns (device, reason)."""
    if choice not in DEVICE_CHOICES:
        raise UserError(f"Unknown device {choice!r}; choose one of: {', '.join(DEVICE_CHOICES)}.")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if choice == "cuda":
        if not cuda:
            raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU.")
        return torch.device("cuda"), f"CUDA ({torch.cuda.get_device_name(0)}), as asked"
    if choice == "mps":
        if not mps:
            raise UserError("--device mps was asked for, but Apple MPS is not available.")
        return torch.device("mps"), "Apple MPS, as asked"
    if choice == "cpu":
        return torch.device("cpu"), "CPU, as asked"
    if cuda:
        return torch.device("cuda"), f"CUDA GPU found ({torch.cuda.get_device_name(0)})"
    if mps:
        return torch.device("mps"), "Apple MPS found (no CUDA GPU)"
    return torch.device("cpu"), "no CUDA GPU or Apple MPS found"


def epoch_steps(images: int, batch_size: int, max_steps: int | None = None) -> int:
    """Optimiser steps in one local epoch over `images` images (the last batch may be short)."""
    steps = (int(images) + batch_size - 1) // batch_size
    return steps if max_steps is None else min(steps, max_steps)


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-4
    loss: str = "huber"
    # channels_last is on by default: 1.1-1.5x faster training on the project's CPU, with
    # weights within 1e-5 of the default layout (benchmarks/train_speed.py). bf16 autocast is
    # faster still on CPUs with native bf16 but stays an option.
    channels_last: bool = True
    bf16: bool = False  # bf16 autocast for the forward pass (CPU or CUDA)
    max_steps_per_epoch: int | None = None  # for benchmarks and smoke tests
    optimizer: str = "adam"  # "adam" or "adamw"; a fresh optimiser every call (every round)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    loss_weighting: str = "none"  # "none" or "min-snr" (see diffusion_loss)
    # The learning rate follows one schedule over the whole federation, counted in this
    # client's steps: `step_offset` steps were taken in earlier rounds, `total_steps` is the
    # length of the whole run (needed by "cosine"). Linear warm-up over `warmup_steps`.
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    step_offset: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0  # where "cosine" ends, as a fraction of lr

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError("Local epochs must be at least 1.")
        if self.batch_size < 1:
            raise UserError("Batch size must be at least 1.")
        if not self.lr > 0:
            raise UserError("Learning rate must be positive.")
        check_choices(self)
        if self.lr_schedule == "cosine" and not self.total_steps:
            raise UserError("A cosine learning-rate schedule needs the run's total steps.")
        if self.warmup_steps < 0 or self.step_offset < 0 or self.weight_decay < 0:
            raise UserError("Warm-up steps, step offset and weight decay cannot be negative.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError("The final learning-rate ratio must be between 0 and 1.")

    def lr_at(self, step: int) -> float:
        """The learning rate of the 0-based global step `step` (offset included)."""
        lr = self.lr
        if self.warmup_steps:
            lr *= min(1.0, (step + 1) / self.warmup_steps)
        if self.lr_schedule == "cosine" and self.total_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            floor = self.min_lr_ratio
            lr *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr

    @property
    def scheduled(self) -> bool:
        return bool(self.warmup_steps) or self.lr_schedule != "constant"


@dataclass
class EpochReport:
    epoch: int  # 1-based
    mean_loss: float
    steps: int
    images: int
    seconds: float
    # Returns the optimiser state as named tensors, for an epoch checkpoint (see train_local).
    optimizer_state: Callable[[], dict[str, torch.Tensor]] | None = field(
        default=None, repr=False, compare=False)


@dataclass
class TrainResult:
    epochs: list[EpochReport] = field(default_factory=list)
    stopped: bool = False

    @property
    def mean_loss(self) -> float:
        steps = sum(e.steps for e in self.epochs)
        if steps == 0:
            return float("nan")
        return sum(e.mean_loss * e.steps for e in self.epochs) / steps

    @property
    def images(self) -> int:
        return sum(e.images for e in self.epochs)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)


StepCallback = Callable[[int, int, float], None]  # (step in epoch, steps per epoch, loss)
EpochCallback = Callable[[EpochReport, nn.Module], None]


_OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adam_state_tensors(optimizer: torch.optim.Optimizer, model: nn.Module
                       ) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat named CPU tensors ("exp_avg.<param>", ...).

    Plain tensors so that a checkpoint stays a safetensors file (never a pickle).
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in _OPTIM_KEYS:
            value = state[key]
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            out[f"{key}.{name}"] = value.detach().to("cpu", torch.float32, copy=True)
    return out


def load_adam_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                    tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what `adam_state_tensors` saved (parameters without state are left fresh)."""
    for name, p in model.named_parameters():
        if f"step.{name}" not in tensors:
            continue
        optimizer.state[p] = {
            "step": tensors[f"step.{name}"].to(torch.float32).reshape(()).clone(),
            "exp_avg": tensors[f"exp_avg.{name}"].to(p.device, p.dtype).reshape(p.shape).clone(),
            "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device, p.dtype)
                          .reshape(p.shape).clone(),
        }


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_local(model: nn.Module, images: torch.Tensor, schedule: DiffusionSchedule,
                config: TrainConfig, seed: int, device: torch.device | str = "cpu",
                start_epoch: int = 0, on_step: StepCallback | None = None,
                on_epoch: EpochCallback | None = None,
                should_stop: Callable[[], bool] | None = None,
                optimizer_state: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    """Train `model` in place on `images` (uint8, N x C x H x W) for the configured epochs.

    `start_epoch` skips epochs already done (resume); with the `optimizer_state` that an epoch
    report's `optimizer_state()` returned, a resumed run gives exactly the weights of one that
    never stopped. `should_stop` is polled between steps; when it returns True training stops
    at once and the result says so.
    """
    config.validate()
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
    n = images.shape[0]
    if n == 0:
        raise UserError("There are no images to train on.")
    device = torch.device(device)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = schedule.to(device)
    model.train()
    # foreach: one multi-tensor kernel per step instead of a loop over parameters (faster).
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
    if optimizer_state:
        load_adam_state(optimizer, model, optimizer_state)
    steps_per_epoch = epoch_steps(n, config.batch_size, config.max_steps_per_epoch)
    result = TrainResult()
    try:
        for epoch in range(start_epoch, config.epochs):
            gen_seed = epoch_seed(seed, epoch)
            order = torch.randperm(n, generator=make_generator(gen_seed, "cpu"))
            noise_gen = make_generator(gen_seed + 1, device)
            started = time.perf_counter()
            loss_sum = 0.0
            seen = 0
            steps = 0
            for step in range(steps_per_epoch):
                if should_stop is not None and should_stop():
                    result.stopped = True
                    return result
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                batch = to_model_range(images.index_select(0, idx).to(device, non_blocking=True))
                if config.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with _autocast(device, config.bf16):
                    loss = diffusion_loss(model, schedule, batch, noise_gen, config.loss,
                                          config.loss_weighting)
                if config.scheduled:
                    lr = config.lr_at(config.step_offset + epoch * steps_per_epoch + step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                loss_sum += value * batch.shape[0]
                seen += batch.shape[0]
                steps += 1
                if on_step is not None:
                    on_step(step + 1, steps_per_epoch, value)
            report = EpochReport(epoch + 1, loss_sum / max(seen, 1), steps, seen,
                                 time.perf_counter() - started,
                                 optimizer_state=lambda: adam_state_tensors(optimizer, model))
            result.epochs.append(report)
            if on_epoch is not None:
                on_epoch(report, model)
    finally:
        if config.channels_last:  # hand the model back in the default layout
            model.to(memory_format=torch.contiguous_format)
    return result
