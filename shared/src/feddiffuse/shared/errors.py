"""The one exception tree of feddiffuse.shared.

FedDiffuseError
  UserError         a mistake the user can fix (bad option, missing data); CLIs print it and exit 2
    DataNotFoundError   a dataset could not be found or read
  WireFormatError   bytes that do not decode to a valid weights/delta file
"""

from __future__ import annotations


class FedDiffuseError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(FedDiffuseError):
    """A mistake the user can fix; the message is one sentence that says what to do."""


class DataNotFoundError(UserError):
    """A dataset could not be found, or a folder holds no usable images."""


class WireFormatError(FedDiffuseError):
    """Bytes that are not a valid FedDiffuse safetensors file."""
