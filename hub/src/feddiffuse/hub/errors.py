"""The hub's errors.

FedDiffuseError (feddiffuse.shared.errors)
  UserError       a mistake an admin can fix (CLI: one sentence on stderr, exit 2)
  HubError        a request the hub refuses; carries an ErrorCode (or a HubCode), answered as
                  `{"code", "message"}` JSON with the code's HTTP status
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from feddiffuse.shared.errors import FedDiffuseError, UserError
from feddiffuse.shared.protocol import ERROR_STATUS, ErrorCode

__all__ = ["HUB_CODE_STATUS", "HubCode", "HubError", "UserError", "error_status"]


class HubCode(StrEnum):
    """Answers of the serving layer that the shared protocol's ErrorCode does not name (yet):
    a client that does not know them goes by the HTTP status, as for any 5xx or 408."""

    UNAVAILABLE = "unavailable"  # too many uploads in progress: retry after Retry-After
    REQUEST_TIMEOUT = "request_timeout"  # the request's body stopped arriving


HUB_CODE_STATUS: dict[HubCode, int] = {HubCode.UNAVAILABLE: 503, HubCode.REQUEST_TIMEOUT: 408}


def error_status(code: ErrorCode | HubCode) -> int:
    return HUB_CODE_STATUS[code] if isinstance(code, HubCode) else ERROR_STATUS[code]


class HubError(FedDiffuseError):
    """A refused request: a machine-readable code and one human sentence."""

    def __init__(self, code: ErrorCode | HubCode, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return error_status(self.code)
