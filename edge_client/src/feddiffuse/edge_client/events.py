"""What the participant loop reports while it works; the CLI prints these, the TUI shows them.

The loop calls an `Emit` callback with one of the frozen dataclasses below. It never touches a
user interface itself, so the same loop runs headless, in a Textual thread worker, and in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from feddiffuse.shared.protocol import Manifest, UploadReceipt

TASKS = ("download", "train", "upload")


@dataclass(frozen=True)
class LogEvent:
    message: str
    level: str = "info"  # info | warning | error


@dataclass(frozen=True)
class DeviceEvent:
    device: str
    reason: str


@dataclass(frozen=True)
class PhaseEvent:
    phase: str  # connecting | downloading | training | uploading | waiting | finished | stopped
    detail: str = ""


@dataclass(frozen=True)
class RoundEvent:
    manifest: Manifest


@dataclass(frozen=True)
class ProgressEvent:
    task: str  # one of TASKS
    done: float
    total: float | None


@dataclass(frozen=True)
class LossEvent:
    epoch: int
    step: int
    loss: float  # mean of the steps since the previous LossEvent


@dataclass(frozen=True)
class EpochEvent:
    epoch: int
    epochs: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class RetryEvent:
    what: str
    attempt: int
    delay: float
    error: str


@dataclass(frozen=True)
class UploadedEvent:
    round: int
    segments: tuple[str, ...]
    receipt: UploadReceipt


Event = (LogEvent | DeviceEvent | PhaseEvent | RoundEvent | ProgressEvent | LossEvent
         | EpochEvent | RetryEvent | UploadedEvent)
Emit = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """An Emit that drops everything."""
