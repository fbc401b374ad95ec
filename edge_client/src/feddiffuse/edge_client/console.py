"""Participant events as lines on a terminal or in a log file (the headless client)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TextIO

from . import events as ev


class ConsoleReporter:
    """An `Emit` that prints one line per event worth a line; progress at every quarter."""

    def __init__(self, stream: TextIO | None = None, stamp: str = "%H:%M:%S") -> None:
        self.stream = stream or sys.stdout
        self.stamp = stamp
        self._quarters: dict[str, int] = {}
        self._last_phase: tuple[str, str] | None = None

    def line(self, text: str) -> None:
        print(f"{time.strftime(self.stamp)} {text}", file=self.stream, flush=True)

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


class FileLog:
    """The same lines, dated, appended to a hub's log file (kept across runs and restarts).

    The file is opened on the first event and closed by `close()`; past `MAX_BYTES` it is
    moved to `<name>.1` (one generation kept) when a run starts. A log that cannot be written
    (a full disk) never stops the client: the line is dropped."""

    MAX_BYTES = 4_000_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reporter: ConsoleReporter | None = None
        self._failed = False

    def __call__(self, event: ev.Event) -> None:
        if self._failed:
            return
        try:
            if self._reporter is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self.path.is_file() and self.path.stat().st_size > self.MAX_BYTES:
                    self.path.replace(self.path.with_name(self.path.name + ".1"))
                stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
                self._reporter = ConsoleReporter(stream, stamp="%Y-%m-%d %H:%M:%S")
            self._reporter(event)
        except OSError:
            self._failed = True

    def close(self) -> None:
        if self._reporter is not None:
            with contextlib.suppress(OSError):
                self._reporter.stream.close()
            self._reporter = None
