"""What the machine offers for training, as choices for people."""

from __future__ import annotations

import torch

from .participant import describe_device


def detected_devices() -> list[tuple[str, str]]:
    """(label, value) pairs for a device menu: auto first, then what PyTorch can use."""
    device, reason = describe_device("auto")
    choices = [(f"Auto: {device.type.upper()} ({reason})", "auto")]
    if torch.cuda.is_available():
        choices.append((f"CUDA GPU: {torch.cuda.get_device_name(0)}", "cuda"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(("Apple MPS (missing operators run on the CPU)", "mps"))
    choices.append(("CPU", "cpu"))
    return choices
