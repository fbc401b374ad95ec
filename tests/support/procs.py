"""Client subprocesses that stop themselves (SIGSTOP) at a test hook."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from .wait import poll_until


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 300.0,
                       describe: Callable[[], str] = lambda: "") -> None:
    """Wait until `proc` stopped itself with SIGSTOP (the pause hook). Fails if it exits, or
    after `timeout` seconds, with `describe()` (its log) in the message."""
    def stopped() -> bool:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid != proc.pid:
            return False
        if os.WIFSTOPPED(status):
            return True
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code  # reaped here: tell Popen
        raise AssertionError(f"the client exited ({code}) before pausing:\n{describe()}")

    poll_until(stopped, "the client paused after its epoch", timeout, describe=describe)
