"""The hub tests' helpers (tests/hub/conftest.py: Kit, ThreadServer, ...) for tests in other
folders. Loaded by path, once per session, because pytest's importlib mode gives test folders
no package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "_feddiffuse_tests_hub_conftest"


def hub_helpers() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    path = Path(__file__).resolve().parents[1] / "hub" / "conftest.py"
    spec = importlib.util.spec_from_file_location(_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
