"""The repository layout: one PEP 420 namespace, three distributions, working scripts."""

import shutil
import subprocess
import sys

import pytest

import feddiffuse


def test_feddiffuse_is_a_namespace_package():
    assert getattr(feddiffuse, "__file__", None) is None
    assert len(list(feddiffuse.__path__)) == 3


@pytest.mark.parametrize("script", ["feddiffuse", "feddiffuse-hub", "feddiffuse-client"])
def test_console_scripts_answer_help(script):
    exe = shutil.which(script) or str(sys.prefix + "/bin/" + script)
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout


def test_distributions_pin_the_same_core_version():
    from importlib.metadata import requires, version

    core = version("feddiffuse-core")
    for dist in ("feddiffuse-hub", "feddiffuse-client"):
        assert f"feddiffuse-core=={core}" in [r.replace(" ", "") for r in requires(dist)]
