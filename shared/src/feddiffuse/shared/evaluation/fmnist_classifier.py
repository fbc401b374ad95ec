"""The small Fashion-MNIST classifier whose penultimate features define `fd_fmnist`.

Inception-v3 features of 28x28 grey clothes are a poor and slow yardstick on a CPU, so the
project also measures a domain Fréchet distance on the 128-d penultimate features of this
CNN (98,000 parameters). It is trained deterministically (10 epochs, seed 2024, 1 thread; about
4 minutes on one core) by

    python -m feddiffuse.shared.evaluation.train_classifier --out weights.safetensors

which rewrote the shipped file byte for byte when rerun. The weights ship inside the package
(fp16 safetensors, 199 KB) with the hash and the test accuracy recorded below; the test suite
checks both.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from torch import nn

from ..data.dataset import conform_images
from ..errors import FedDiffuseError

WEIGHTS_FILE = "fmnist_classifier.safetensors"
# Recorded by the training script; the test suite checks both against the shipped file.
WEIGHTS_SHA256 = "5726482679e7c927b43375ce0efad06531aa891b89f4c341b739ba2695fb70ba"
TEST_ACCURACY = 0.9145  # on the 10,000 test images, with the shipped fp16 weights
FEATURE_DIM = 128
IMAGE_SIZE = 28
# Fashion-MNIST training-set pixel mean and standard deviation (in [0, 1]).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


class ClassifierWeightsError(FedDiffuseError):
    """The shipped classifier weights are missing or do not match their recorded hash."""


class FashionMNISTClassifier(nn.Module):
    """Three conv stages (16, 32, 64 channels, 28 -> 14 -> 7 -> 3) and a 128-unit layer whose
    output is the feature vector; about 2 M multiply-adds per image, so thousands of images/s."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *stage(1, 16), *stage(16, 32), *stage(32, 64), nn.Flatten(),
            nn.Linear(64 * 3 * 3, FEATURE_DIM), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, num_classes))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (any size, 1 or 3 channels) to the normalised 1 x 28 x 28 input."""
        grey = conform_images(images, channels=1, image_size=IMAGE_SIZE)
        return (grey.to(torch.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N x 128) of a prepared batch."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def shipped_weights_path() -> Path:
    return Path(str(resources.files("feddiffuse.shared.evaluation") / "weights" / WEIGHTS_FILE))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_classifier(path: str | Path | None = None, check_hash: bool = True
                    ) -> FashionMNISTClassifier:
    """The classifier in eval mode with the shipped weights (or those at `path`), in fp32."""
    path = Path(path) if path is not None else shipped_weights_path()
    if not path.is_file():
        raise ClassifierWeightsError(f"The Fashion-MNIST classifier weights are missing ({path}); "
                                     "reinstall feddiffuse-core.")
    data = path.read_bytes()
    if check_hash and hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise ClassifierWeightsError(f"{path} does not match the recorded sha256 "
                                     f"{WEIGHTS_SHA256[:12]}...; reinstall feddiffuse-core.")
    state = {k: v.to(torch.float32) if v.is_floating_point() else v
             for k, v in st_load(data).items()}
    model = FashionMNISTClassifier()
    model.load_state_dict(state, strict=True)
    return model.eval()
