"""Participant events as lines on a terminal or in a log file (the headless client)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from . import events as ev


class ConsoleReporter:
    """An `Emit` that prints one line per event worth a line; progress at every quarter."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._quarters: dict[str, int] = {}
        self._last_phase: tuple[str, str] | None = None

    def line(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)

    def __call__(self, event: ev.Event) -> None:
        match event:
            case ev.LogEvent(message=message, level=level):
                self.line(message if level == "info" else f"{level}: {message}")
            case ev.DeviceEvent(device=device, reason=reason):
                self.line(f"Training on {device}: {reason}.")
            case ev.PhaseEvent(phase=phase, detail=detail):
                if (phase, detail) != self._last_phase and phase not in ("connecting",
                                                                         "retrying"):
                    self.line(f"[{phase}] {detail}")
                self._last_phase = (phase, detail)
                if phase in ("downloading", "training", "uploading"):
                    self._quarters.pop({"downloading": "download", "training": "train",
                                        "uploading": "upload"}[phase], None)
            case ev.RoundEvent(manifest=m):
                self.line(f"Federation {m.federation}: round {m.round}/{m.rounds} ({m.phase}), "
                          f"method {m.method}, you are {m.client_id}; upload: "
                          f"{', '.join(m.upload_segments) or '-'}.")
            case ev.ProgressEvent(task=task, done=done, total=total):
                if total:
                    quarter = int(4 * done / total)
                    if quarter > self._quarters.get(task, 0):
                        self._quarters[task] = quarter
                        self.line(f"  {task}: {100 * done / total:.0f}%")
            case ev.RetryEvent(what=what, attempt=attempt, delay=delay, error=error):
                self.line(f"retry: {what} failed ({error}); attempt {attempt + 1} in "
                          f"{delay:.1f} s")
            case _:
                pass
