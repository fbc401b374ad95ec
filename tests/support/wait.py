"""Waiting on a condition, never on a fixed time: the one polling loop of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(condition: Callable[[], T], what: str, timeout: float = 60.0,
               interval: float = 0.05, describe: Callable[[], str] = lambda: "") -> T:
    """Call `condition` until it returns something true, and return that. After `timeout`
    seconds (a bound for a stuck run, not a speed) fail saying `what` never happened, with
    `describe()` (a log, a status) after it. `condition` may raise to fail at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = describe()
            raise AssertionError(f"within {timeout:g} s, never: {what}"
                                 + (f"\n{detail}" if detail else ""))
        time.sleep(interval)
