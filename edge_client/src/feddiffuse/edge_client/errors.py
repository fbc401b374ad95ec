"""The one exception tree of the edge client.

    FedDiffuseError                 (feddiffuse.shared.errors)
      UserError                     a mistake the user can fix; commands print it and exit 2
        SetupError                  bad input: malformed URL, no images, unknown hub, no token
        HubUnreachable              first contact with a hub failed (only before joining it)
        TokenRejected               401/403: the token is wrong or has been revoked
        HubLocked                   another client process is running for this hub
      HubCallError                  a call to the hub went wrong (the hub's own HubError is a
                                    refused request, on the hub's side)
        HubUnavailable              refused, DNS, timeout, 5xx, a transfer cut off: retried
        CertificateUntrusted        TLS: the hub's certificate is not trusted (never retried)
        DownloadCorrupt             a download does not match its sha256: retried from scratch
        HubRejected                 the hub refused a request (4xx with an ErrorBody)
          RoundMovedOn              409 and friends: fetch the manifest and rejoin the round
          FederationFinished        the federation is over
          TokenRejected             (also a UserError, above)
      Cancelled                     the user stopped the client (Cancel, Ctrl-C)

httpx exceptions are translated into this tree in exactly one place, `hub_client._translate`.
"""

from __future__ import annotations

from feddiffuse.shared.errors import FedDiffuseError, UserError

__all__ = [
    "Cancelled",
    "CertificateUntrusted",
    "DownloadCorrupt",
    "FederationFinished",
    "HubCallError",
    "HubLocked",
    "HubRejected",
    "HubUnavailable",
    "HubUnreachable",
    "RoundMovedOn",
    "SetupError",
    "TokenRejected",
    "UserError",
]


class SetupError(UserError):
    """Bad input from the user: the message is one sentence that says what to do."""


class HubLocked(UserError):
    """Another client process holds this hub's state folder."""


class HubCallError(FedDiffuseError):
    """Talking to the hub went wrong."""


class HubUnavailable(HubCallError):
    """The hub could not be reached or failed on its side; worth retrying."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CertificateUntrusted(HubCallError, UserError):
    """The hub's TLS certificate is not signed by a CA this client trusts (--ca-cert)."""


class HubUnreachable(UserError):
    """First contact with a hub failed; nothing was saved."""


class DownloadCorrupt(HubCallError):
    """The downloaded bytes do not match their checksum or do not decode."""


class HubRejected(HubCallError):
    """The hub answered a request with an error it means (a 4xx and an ErrorBody)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RoundMovedOn(HubRejected):
    """The round the client worked on is closed or its base version is stale."""


class FederationFinished(HubRejected):
    """The federation has run all its rounds."""


class TokenRejected(HubRejected, UserError):
    """401/403: the token is wrong or has been revoked."""


class Cancelled(FedDiffuseError):
    """The user stopped the client; state on disk is consistent and resumable."""
