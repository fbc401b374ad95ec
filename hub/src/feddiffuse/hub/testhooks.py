"""Crash points for the hub's kill -9 tests. A test hook, off by default.

With the environment variable FEDDIFFUSE_HUB_TEST_CRASH_AT set to one of CRASH_POINTS, the hub
process ends on the spot (os._exit, no cleanup, like kill -9) when it reaches that point:

- ``upload-commit``: an accepted upload's blob is in place but not yet recorded in the database;
- ``aggregate``: half of the round's uploads have been folded into the running sum;
- ``publish``: the new global model's blob is written but not yet published.

Never set it outside tests: a hub with it set dies on purpose.
"""

from __future__ import annotations

import os

CRASH_ENV = "FEDDIFFUSE_HUB_TEST_CRASH_AT"
CRASH_EXIT_CODE = 86
CRASH_POINTS = ("upload-commit", "aggregate", "publish")


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)
