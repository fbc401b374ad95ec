"""The `feddiffuse` research command line."""

from .main import app, main

__all__ = ["app", "main"]
