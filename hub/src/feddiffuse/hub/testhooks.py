"""Test hooks of the hub, off by default.

Crash points, for the kill -9 tests: with the environment variable FEDDIFFUSE_HUB_TEST_CRASH_AT
set to one of CRASH_POINTS, the hub process ends on the spot (os._exit, no cleanup, like
kill -9) when it reaches that point:

- ``upload-commit``: an accepted upload's blob is in place but not yet recorded in the database;
- ``aggregate``: half of the round's uploads have been folded into the running sum;
- ``publish``: the new global model's blob is written but not yet published.

Never set it outside tests: a hub with it set dies on purpose.

Pause points, for tests that force an interleaving in one process: `on(name, hook)` makes the
hub call `hook()` when it reaches `reach(name)` (in the thread that got there), so a test can
hold it there with an event while it does something else. PAUSE_POINTS lists them:

- ``upload-commit``: an upload's body has been received and checked, not yet recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CRASH_ENV = "FEDDIFFUSE_HUB_TEST_CRASH_AT"
CRASH_EXIT_CODE = 86
CRASH_POINTS = ("upload-commit", "aggregate", "publish")
PAUSE_POINTS = ("upload-commit",)

_hooks: dict[str, Callable[[], None]] = {}


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


def reach(name: str) -> None:
    hook = _hooks.get(name)
    if hook is not None:
        hook()


@contextmanager
def on(name: str, hook: Callable[[], None]) -> Iterator[None]:
    """Call `hook` whenever the hub reaches pause point `name`, within this block."""
    if name not in PAUSE_POINTS:
        raise ValueError(f"unknown pause point {name!r}; there are {', '.join(PAUSE_POINTS)}")
    _hooks[name] = hook
    try:
        yield
    finally:
        _hooks.pop(name, None)
