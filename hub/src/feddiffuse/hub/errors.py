"""The hub's errors.

FedDiffuseError (feddiffuse.shared.errors)
  UserError       a mistake an admin can fix (CLI: one sentence on stderr, exit 2)
  HubError        a request the hub refuses; carries an ErrorCode, answered as ErrorBody JSON
                  with the code's HTTP status (feddiffuse.shared.protocol.ERROR_STATUS)
"""

from __future__ import annotations

from collections.abc import Mapping

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.protocol import ERROR_STATUS, ErrorBody, ErrorCode

__all__ = ["HubError", "UserError"]


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
        return ERROR_STATUS[self.code]

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message)
