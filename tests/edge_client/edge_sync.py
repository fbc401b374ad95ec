"""Forcing the interleavings the edge client tests rely on, instead of hoping for them.

- `wait_until(pilot, condition)`: poll a condition from the Textual event loop (for example
  `on_screen(app, Dashboard)`: shown *and* mounted, so its widgets can be queried); fail the
  test with a sentence when it never holds (the timeout is only there so a broken build fails
  instead of hanging, never as a time budget after which the test goes on anyway).
- `TrainingGate`: wraps the round's `train_local` (in edge_client.round_work) so training
  holds at a chosen step or epoch until the test releases it. A test can then press Cancel,
  leave the dashboard or rejoin while the loop is surely still training, on any machine.
- `wait_until_stopped(proc)`: wait until a client subprocess run with
  `FEDDIFFUSE_TEST_PAUSE_AFTER_EPOCH=N` has stopped itself (SIGSTOP) after epoch N.
- `LineReader`: a subprocess's output read in a thread, with a wait for a line.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from support.procs import wait_until_stopped as _wait_until_stopped

GENEROUS_S = 300.0  # fails a hung test; no correct run comes near it


async def wait_until(pilot, condition: Callable[[], bool], timeout: float = GENEROUS_S,
                     what: str = "the app") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def on_screen(app, screen_type) -> bool:
    """The app shows a `screen_type` screen whose widgets are composed and mounted."""
    return isinstance(app.screen, screen_type) and app.screen.is_mounted


@dataclass
class GatedRun:
    """One call of `train_local` made by the participant."""

    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # optimiser steps taken in this call
    steps_after_release: int = 0
    result: object = None  # the TrainResult, once the call returned


class TrainingGate:
    """Holds each training run of the participant after `hold_after_step` steps (counted in
    that run) or right after the checkpoint of epoch `hold_after_epoch`, until released.

    While held, the participant's own step and epoch callbacks have run (its progress and
    loss events are posted, the checkpoint is on disk), and the next thing the training loop
    does is poll `should_stop`, so a Cancel made while held stops it "at the next step".
    The progress throttle is switched off so every step posts its progress event.
    """

    def __init__(self, monkeypatch, *, hold_after_step: int | None = None,
                 hold_after_epoch: int | None = None, timeout: float = GENEROUS_S) -> None:
        from feddiffuse.edge_client import participant, round_work

        assert (hold_after_step is None) != (hold_after_epoch is None)
        self.hold_after_step = hold_after_step
        self.hold_after_epoch = hold_after_epoch
        self.timeout = timeout
        self.runs: list[GatedRun] = []
        self._closed = False
        self._real = round_work.train_local
        monkeypatch.setattr(round_work, "train_local", self._train_local)
        monkeypatch.setattr(round_work, "PROGRESS_INTERVAL_S", 0.0)
        monkeypatch.setattr(participant, "PROGRESS_INTERVAL_S", 0.0)

    def run(self, index: int) -> GatedRun | None:
        return self.runs[index] if index < len(self.runs) else None

    def held(self, index: int) -> bool:
        run = self.run(index)
        return run is not None and run.held.is_set() and not run.release.is_set()

    def release(self, index: int) -> None:
        self.runs[index].release.set()

    def close(self) -> None:
        """Let every run (and any later one) go: for the test's cleanup."""
        self._closed = True
        for run in self.runs:
            run.release.set()

    def _hold(self, run: GatedRun) -> None:
        if self._closed:
            return
        run.held.set()
        if not run.release.wait(self.timeout):
            raise RuntimeError("the test never released the training gate")

    def _train_local(self, *args, **kwargs):
        run = GatedRun()
        self.runs.append(run)
        on_step = kwargs.pop("on_step", None)
        on_epoch = kwargs.pop("on_epoch", None)

        def step_hook(step: int, per_epoch: int, loss: float) -> None:
            if on_step is not None:
                on_step(step, per_epoch, loss)
            run.steps += 1
            if run.release.is_set():
                run.steps_after_release += 1
            if run.steps == self.hold_after_step:
                self._hold(run)

        def epoch_hook(report, model) -> None:
            if on_epoch is not None:
                on_epoch(report, model)
            if report.epoch == self.hold_after_epoch:
                self._hold(run)

        try:
            run.result = self._real(*args, on_step=step_hook, on_epoch=epoch_hook, **kwargs)
            return run.result
        finally:
            run.done.set()


# -- client subprocesses ----------------------------------------------------------------------



def wait_until_stopped(proc: subprocess.Popen, timeout: float = GENEROUS_S,
                       describe: Callable[[], str] = lambda: "") -> None:
    """`support.procs.wait_until_stopped` with this module's generous timeout."""
    _wait_until_stopped(proc, timeout, describe)


class LineReader:
    """Collects a text-mode subprocess's stdout in a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], what: str,
                 timeout: float = GENEROUS_S, start: int = 0) -> int:
        """Wait for a line (from index `start`) that `predicate` accepts; return its index.
        Fails when the process ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(start, len(self.lines)):
                    if predicate(self.lines[i]):
                        return i
                start = len(self.lines)
                if not self._thread.is_alive():
                    raise AssertionError(f"the client ended ({self.proc.poll()}) before "
                                         f"{what}:\n{self.text()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}:\n{self.text()}")
                self._changed.wait(min(left, 1.0))

    def join(self, timeout: float = GENEROUS_S) -> None:
        self._thread.join(timeout)
