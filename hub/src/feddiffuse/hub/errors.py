"""The hub's errors.

FedDiffuseError (feddiffuse.shared.errors)
  UserError       a mistake an admin can fix (CLI: one sentence on stderr, exit 2)
  HubError        a request the hub refuses; carries an ErrorCode, answered as
                  `{"code", "message"}` JSON with the code's HTTP status (ERROR_STATUS)
"""

from __future__ import annotations

from collections.abc import Mapping

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.protocol import ERROR_STATUS, ErrorCode

__all__ = ["HubError", "UserError", "error_status"]


def error_status(code: ErrorCode) -> int:
    return ERROR_STATUS[code]


class HubError(FedDiffuseError):
    """A refused request: a machine-readable code and one human sentence."""

    def __init__(self, code: ErrorCode, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return error_status(self.code)
