"""Client subprocesses that stop themselves (SIGSTOP) at a test hook."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 300.0,
                       describe: Callable[[], str] = lambda: "") -> None:
    """Wait until `proc` stopped itself with SIGSTOP (the pause hook). Fails if it exits, or
    after `timeout` seconds, with `describe()` (its log) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid == proc.pid:
            if os.WIFSTOPPED(status):
                return
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # reaped here: tell Popen
            raise AssertionError(f"the client exited ({code}) before pausing:\n{describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the client never paused after its epoch:\n{describe()}")
        time.sleep(0.05)
