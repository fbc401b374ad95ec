"""Where the client keeps its files, and the settings that persist between runs.

Everything lives under one folder: ``$FEDDIFFUSE_HOME/client`` when that variable is set (tests
and portable installs), else the platform's user data folder (platformdirs). Settings are
the last choices made in the terminal app or on the command line (hub URL, image folder,
device, how the Samples screen shows a grid); the token is not a setting, it sits in the
hub's state folder with mode 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feddiffuse.shared.wire import atomic_write_bytes

HOME_ENV = "FEDDIFFUSE_HOME"
APP_NAME = "feddiffuse"


def client_home() -> Path:
    """The folder that holds the settings file and one state folder per hub."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser() / "client"
    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "client"


def settings_path() -> Path:
    return client_home() / "settings.json"


class Settings(BaseModel):
    """The user's last choices; every field has a default so an old file still loads."""

    model_config = ConfigDict(extra="ignore")

    hub_url: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    sample_count: int = Field(default=64, ge=1, le=1024)
    sample_steps: int = Field(default=50, ge=1, le=1000)
    grid_fit: bool = True  # the Samples screen fits the grid to the window (else full size)

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        """The saved settings, or the defaults when there are none (or they are unreadable)."""
        path = path or settings_path()
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError):
            return cls()

    def save(self, path: Path | None = None) -> Path:
        path = path or settings_path()
        atomic_write_bytes(path, self.model_dump_json(indent=2).encode("utf-8"))
        return path
