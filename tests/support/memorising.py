"""A tiny UNet that has memorised 16 Fashion-MNIST images, for the memorisation audit tests.

Training it takes about ten minutes on the project's two-core CPU (measured: after 250
steps of the whole 16-image batch none of 16 samples was a near-copy, after 500 about two
thirds, after 1,000 all), too slow for every test run, so its weights are kept beside this
file (fp16) and made again, deterministically, by

    python tests/support/memorising.py

The model is the `tiny` preset trained by the product's own loop (`train_local`) with the
product's diffusion (1,000 steps, linear betas) on the Fashion-MNIST training images
MEMORISED. A 10-step diffusion memorised no faster (about 500 steps too), so the product's
is kept: the audit then runs exactly as a data owner's does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from feddiffuse.shared.diffusion import DiffusionSchedule
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.training import TrainConfig, train_local

WEIGHTS = Path(__file__).with_name("memorised-tiny.safetensors")
MEMORISED = range(0, 16)  # indices into the Fashion-MNIST training set
STEPS = 1000
PRESET = "tiny"


def schedule() -> DiffusionSchedule:
    return DiffusionSchedule.linear()  # the product's


def fmnist_train_images() -> torch.Tensor:
    from feddiffuse.shared.data import load_fashion_mnist

    return load_fashion_mnist("train").images


def train(images: torch.Tensor, steps: int = STEPS, seed: int = 0) -> dict[str, torch.Tensor]:
    model = build_unet(PRESET, seed=seed)
    config = TrainConfig(epochs=steps, batch_size=len(images), lr=1e-3, loss="mse")
    train_local(model, images, schedule(), config, seed=seed)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def load_weights() -> dict[str, torch.Tensor]:
    """The memorising model's weights, in float32."""
    return {k: v.float() for k, v in load_file(WEIGHTS).items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    started = time.perf_counter()
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    weights = train(fmnist_train_images()[list(MEMORISED)], steps)
    save_file({k: v.half() for k, v in weights.items()}, WEIGHTS,
              metadata={"preset": PRESET, "steps": str(steps),
                        "memorised": f"fmnist-train[{MEMORISED.start}:{MEMORISED.stop}]"})
    print(f"wrote {WEIGHTS} after {steps} steps in {time.perf_counter() - started:.0f} s")
