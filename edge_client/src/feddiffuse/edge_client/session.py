"""Joining a hub: check everything the user typed, talk to the hub once, then save.

Shared by `feddiffuse-client join` and the terminal app's setup screen. Nothing is written
until every check has passed, so a typo leaves no trace on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from feddiffuse.shared.protocol import PROTOCOL_VERSION, FederationInfo, Manifest

from .backoff import Backoff, call_with_retry
from .errors import HubUnavailable, HubUnreachable, SetupError
from .hub_client import HubClient
from .inputs import (
    FolderScan,
    check_ca_cert,
    check_image_folder,
    check_token,
    normalize_hub_url,
)
from .participant import describe_device
from .settings import Settings
from .state import HubFolder

HttpFactory = Callable[[], httpx.Client]


@dataclass
class JoinRequest:
    hub_url: str | None
    token: str | None
    data_dir: str | None
    device: str = "auto"
    ca_cert: str | None = None  # a CA certificate to trust for this hub (a private CA)


@dataclass
class Joined:
    url: str
    token: str
    data_dir: Path
    device: str
    device_reason: str
    scan: FolderScan
    store: HubFolder
    federation: FederationInfo | None  # None when a known hub was not asked again
    ca_cert: Path | None = None


def make_hub_client(url: str, token: str | None, http_factory: HttpFactory | None = None,
                    timeout: float = 30.0, ca_cert: str | Path | None = None) -> HubClient:
    if http_factory is not None:
        return HubClient(url, token, http=http_factory())
    return HubClient(url, token, timeout=timeout, ca_cert=ca_cert)


def first_contact(url: str, token: str, *, http_factory: HttpFactory | None = None,
                  wait: bool = False, backoff: Backoff | None = None,
                  stop: threading.Event | None = None, on_retry=None,
                  ca_cert: str | Path | None = None) -> tuple[FederationInfo, Manifest]:
    """Ask the hub who it is and whether it accepts the token (HubUnreachable if it is down,
    CertificateUntrusted if its TLS certificate is not trusted, TokenRejected if the token is
    wrong). With `wait`, keep trying until it is up."""
    with make_hub_client(url, token, http_factory, timeout=15.0, ca_cert=ca_cert) as hub:
        def ask() -> tuple[FederationInfo, Manifest]:
            return hub.federation(), hub.manifest()

        try:
            if wait:
                info, manifest = call_with_retry(ask, what="reaching the hub",
                                                 backoff=backoff or Backoff(), stop=stop,
                                                 on_retry=on_retry)
            else:
                info, manifest = ask()
        except HubUnavailable as exc:
            raise HubUnreachable(f"Cannot reach a hub at {url} ({_reason(exc)}); check the "
                                 "address and that the hub is running.") from None
    if info.protocol != PROTOCOL_VERSION:
        raise SetupError(f"The hub at {url} speaks protocol {info.protocol} and this client "
                         f"speaks {PROTOCOL_VERSION}; install the matching feddiffuse-client.")
    return info, manifest


def _reason(exc: HubUnavailable) -> str:
    text = str(exc)
    if "(" in text and text.endswith(")"):
        return text[text.index("(") + 1:-1]
    return text.split(" at ", 1)[0] if " at " in text else text


def resolve(request: JoinRequest, settings: Settings) -> JoinRequest:
    """Fill what the user left out from the saved settings and the stored token."""
    url_text = request.hub_url or settings.hub_url
    if not url_text:
        raise SetupError("No hub given; pass --hub URL (with --token) the first time.")
    url = normalize_hub_url(url_text)
    token = request.token or HubFolder(url).read_token()
    if not token:
        raise SetupError(f"No token for {url}; pass --token with the token the hub operator "
                         "gave you.")
    data = request.data_dir or settings.data_dir
    if not data:
        raise SetupError("No image folder given; pass --data with the folder of your images.")
    ca_cert = request.ca_cert or HubFolder(url).load_info().ca_cert
    return JoinRequest(url, token, data, request.device or settings.device or "auto", ca_cert)


def join(request: JoinRequest, *, http_factory: HttpFactory | None = None, wait: bool = False,
         backoff: Backoff | None = None, stop: threading.Event | None = None,
         on_retry=None, settings: Settings | None = None) -> Joined:
    """Check the request, contact the hub when needed, and save settings, token and hub info."""
    settings = settings or Settings.load()
    url = normalize_hub_url(request.hub_url)
    token = check_token(request.token)
    ca_cert = check_ca_cert(request.ca_cert)
    scan = check_image_folder(request.data_dir)
    device, reason = describe_device(request.device or "auto")
    store = HubFolder(url)
    known = (store.exists() and store.read_token() == token
             and store.load_info().ca_cert == (str(ca_cert) if ca_cert else None))
    federation = None
    if not known:
        federation, manifest = first_contact(url, token, http_factory=http_factory, wait=wait,
                                             backoff=backoff, stop=stop, on_retry=on_retry,
                                             ca_cert=ca_cert)
    # Every check passed: now write.
    store.ensure()
    store.write_token(token)
    if store.exists() or ca_cert is not None:
        store.update_info(url=url, ca_cert=str(ca_cert) if ca_cert else None)
    if federation is not None and store.load_info().global_version is None:
        # Once weights are held, the participant compares the federation with what it knows.
        store.update_info(url=url, federation=federation.name, preset=federation.preset,
                          method=federation.method, rounds=federation.rounds,
                          client_id=manifest.client_id)
    updated = settings.model_copy(update={"hub_url": url, "data_dir": str(scan.path),
                                          "device": request.device or "auto"})
    updated.save()
    return Joined(url, token, scan.path, request.device or "auto", f"{device} ({reason})", scan,
                  store, federation, ca_cert)
