"""The hub package's public surface, and what its light commands import."""

from __future__ import annotations

import subprocess
import sys

import feddiffuse.hub as hub_package


def test_all_is_honest():
    for name in hub_package.__all__:
        assert getattr(hub_package, name) is not None


def test_token_commands_do_not_load_pytorch():
    code = ("import sys, feddiffuse.hub.cli.tokens, feddiffuse.hub.store; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
