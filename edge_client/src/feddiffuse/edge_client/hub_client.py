"""The hub's HTTP API (feddiffuse.shared.protocol) seen from the client, over httpx.

`HubClient` accepts an `httpx.Client` (or a transport), so tests can bind it to the hub's app,
to a fake, or to a real server on loopback. Every httpx exception and every error response
is translated into the client's exception tree here and nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
from pydantic import ValidationError

from feddiffuse.shared.protocol import (
    API_PREFIX,
    CONTENT_SHA256_HEADER,
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    ErrorCode,
    FederationInfo,
    Manifest,
    UploadReceipt,
)

from .errors import (
    Cancelled,
    CertificateUntrusted,
    DownloadCorrupt,
    FederationFinished,
    HubCallError,
    HubRejected,
    HubUnavailable,
    RoundMovedOn,
    TokenRejected,
)

Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all or None)
ShouldStop = Callable[[], bool]

CHUNK = 1 << 16
SHA256_HEADER = CONTENT_SHA256_HEADER  # sent with uploads; checked on downloads
_MOVED_ON = {ErrorCode.ROUND_CLOSED, ErrorCode.STALE_BASE, ErrorCode.NOT_PARTICIPANT,
             ErrorCode.CONFLICT}
_RETRY_STATUS = {408, 425, 429}


def _client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feddiffuse-client")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _translate(exc: httpx.HTTPError, url: str) -> HubCallError:
    """The one place where httpx's transport errors become the client's errors."""
    if _certificate_failure(exc):
        return CertificateUntrusted(
            f"The hub at {url} presented a certificate this machine does not trust "
            f"({_certificate_failure(exc)}); pass --ca-cert FILE with the certificate of the "
            "authority that signed it (ask the hub operator).")
    if isinstance(exc, httpx.ConnectTimeout):
        return HubUnavailable(f"the hub at {url} did not accept a connection in time")
    if isinstance(exc, httpx.TimeoutException):
        return HubUnavailable(f"the hub at {url} did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        reason = str(exc) or "connection failed"
        if "refused" in reason.lower():
            reason = "connection refused"
        elif "name or service" in reason.lower() or "nodename" in reason.lower():
            reason = "the host name does not resolve"
        return HubUnavailable(f"cannot connect to the hub at {url} ({reason})")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return HubUnavailable(f"the connection to the hub at {url} was cut off")
    if isinstance(exc, httpx.TransportError):
        return HubUnavailable(f"network error talking to the hub at {url}: {exc}")
    return HubUnavailable(f"HTTP error talking to the hub at {url}: {exc}")


def _certificate_failure(exc: BaseException) -> str | None:
    """The verifier's reason when `exc` (or what caused it) is a failed certificate check."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or "certificate verify failed"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("certificate verify failed:", 1)[-1].strip(" ()_")
        return detail.split(" (_ssl")[0] or "certificate verify failed"
    return None


def tls_verify(ca_cert: str | Path | None) -> ssl.SSLContext | bool:
    """What httpx verifies a hub's certificate with: the system's CAs, or those in `ca_cert`."""
    if ca_cert is None:
        return True
    return ssl.create_default_context(cafile=str(ca_cert))


def _error_from_response(response: httpx.Response, url: str) -> HubCallError:
    """The exception an error response means, using its ErrorBody when it has one."""
    status = response.status_code
    body: ErrorBody | None = None
    with contextlib.suppress(ValidationError, ValueError, TypeError):
        body = ErrorBody.model_validate_json(response.content)
    code = body.code if body else None
    said = body.message if body else (response.reason_phrase or f"HTTP {status}")
    if status in (401, 403) or code in (ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN):
        return TokenRejected(f"The hub at {url} rejected the token ({said}): it is wrong or has "
                             "been revoked; ask the hub operator for a valid one.",
                             status, code)
    if code == ErrorCode.FEDERATION_FINISHED:
        return FederationFinished(f"The federation is finished ({said}).", status, code)
    # 503 unavailable (busy: too many uploads at once) and 408 request_timeout (the hub cut
    # off a request that stalled) are worth sending again, after Retry-After when it is said.
    if (status >= 500 or status in _RETRY_STATUS
            or code in (ErrorCode.UNAVAILABLE, ErrorCode.REQUEST_TIMEOUT)):
        return HubUnavailable(f"the hub at {url} answered {status} ({said})",
                              retry_after=_retry_after(response))
    if status == 409 or code in _MOVED_ON:
        return RoundMovedOn(f"the round moved on ({said})", status, code)
    if status == 404 and code in (None, ErrorCode.NOT_FOUND):
        return RoundMovedOn(f"not found on the hub ({said})", status, code)
    return HubRejected(f"the hub refused the request: {said} (HTTP {status})", status, code)


def _expected_sha256(response: httpx.Response) -> str | None:
    """A sha256 of the whole body announced in the response headers, if any."""
    value = response.headers.get(SHA256_HEADER)
    if value:
        return value.strip().strip('"').lower()
    for name in ("repr-digest", "digest"):
        for part in response.headers.get(name, "").split(","):
            algo, _, enc = part.strip().partition("=")
            if algo.lower() == "sha-256" and enc:
                with contextlib.suppress(ValueError):
                    return base64.b64decode(enc.strip(":")).hex()
    return None


class HubClient:
    """A thin, typed client of one hub."""

    def __init__(self, url: str, token: str | None = None, *, http: httpx.Client | None = None,
                 transport: httpx.BaseTransport | None = None, timeout: float = 30.0,
                 ca_cert: str | Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._owns_http = http is None
        self._http = http or httpx.Client(
            transport=transport,
            verify=tls_verify(ca_cert),
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"User-Agent": f"feddiffuse-client/{_client_version()}"},
            follow_redirects=True,
        )

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def endpoint(self, path: str) -> str:
        return f"{self.url}{API_PREFIX}{path}"

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = self._headers(kwargs.pop("headers", None))
        try:
            response = self._http.request(method, self.endpoint(path), headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise _translate(exc, self.url) from exc
        if response.status_code >= 400:
            raise _error_from_response(response, self.url)
        return response

    def _parse(self, model, response: httpx.Response):
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise HubRejected(f"the hub at {self.url} sent a {model.__name__} this client does "
                              "not understand; update feddiffuse-client", response.status_code
                              ) from exc

    # -- the API ------------------------------------------------------------------------------

    def federation(self) -> FederationInfo:
        return self._parse(FederationInfo, self._request("GET", "/federation"))

    def manifest(self, wait: float = 0.0) -> Manifest:
        """The caller's manifest. With `wait`, a hub that has nothing for the caller to do
        holds the answer until a round opens or `wait` seconds pass (a long poll)."""
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        return self._parse(Manifest, self._request("GET", "/manifest", params=params))

    def download_model(self, version: str, segments: Sequence[str], dest: Path, *,
                       on_progress: Progress | None = None,
                       should_stop: ShouldStop | None = None, base: str | None = None) -> str:
        """Download segments of a global version to `dest`; returns the body's sha256. With
        `base`, the update from that version instead (a lossy downlink).

        A cut-off download leaves `dest.part`; the next call asks for the rest with a Range
        request (If-Range on the ETag), and starts over when the hub cannot resume. When the
        hub announces a sha256, a mismatch deletes the partial file and raises DownloadCorrupt.
        """
        part = dest.with_name(dest.name + ".part")
        meta_path = dest.with_name(dest.name + ".part.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        meta = _read_json(meta_path)
        offset = part.stat().st_size if part.is_file() else 0
        headers: dict[str, str] = {}
        if offset and meta.get("etag"):
            headers = {"Range": f"bytes={offset}-", "If-Range": meta["etag"]}
        elif offset:
            part.unlink()
            offset = 0
        params = {"segments": ",".join(segments)}
        if base is not None:
            params["base"] = base
        url = self.endpoint(f"/models/{version}")
        try:
            with self._http.stream("GET", url, params=params,
                                   headers=self._headers(headers)) as response:
                if response.status_code == 416:  # what we hold is not a prefix any more
                    _unlink(part, meta_path)
                    raise HubUnavailable("the partial download cannot be resumed; starting over",
                                         retry_after=0.0)
                if response.status_code >= 400:
                    response.read()
                    raise _error_from_response(response, self.url)
                if response.status_code == 206 and _range_start(response) == offset:
                    mode = "ab"
                    expected = _expected_sha256(response) or meta.get("sha256")
                    total = meta.get("total")
                else:
                    mode, offset = "wb", 0
                    expected = _expected_sha256(response)
                    length = response.headers.get("content-length")
                    total = int(length) if length and length.isdigit() else None
                    _write_json(meta_path, {"etag": response.headers.get("etag"),
                                            "sha256": expected, "total": total})
                done = offset
                if on_progress is not None:
                    on_progress(done, total)
                with open(part, mode) as f:
                    for chunk in response.iter_bytes(CHUNK):
                        f.write(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, total)
                        if should_stop is not None and should_stop():
                            raise Cancelled("download stopped")
                    f.flush()
                    os.fsync(f.fileno())
        except httpx.HTTPError as exc:
            raise _translate(exc, self.url) from exc
        size = part.stat().st_size
        if total is not None and size != total:
            raise HubUnavailable(f"the download stopped at {size} of {total} bytes")
        digest = _file_sha256(part)
        if expected and digest != expected:
            _unlink(part, meta_path)
            raise DownloadCorrupt(f"the downloaded model does not match its sha256 "
                                  f"({digest[:12]}... instead of {expected[:12]}...)")
        os.replace(part, dest)
        _unlink(meta_path)
        return digest

    def upload_update(self, round_index: int, body: bytes, *,
                      on_progress: Progress | None = None) -> UploadReceipt:
        """PUT a delta file for `round_index`; returns the hub's receipt."""
        total = len(body)
        digest = hashlib.sha256(body).hexdigest()

        def chunks() -> Iterator[bytes]:
            for start in range(0, total, CHUNK):
                piece = body[start:start + CHUNK]
                yield piece
                if on_progress is not None:
                    on_progress(start + len(piece), total)

        if on_progress is not None:
            on_progress(0, total)
        response = self._request(
            "PUT", f"/rounds/{round_index}/update", content=chunks(),
            headers={"Content-Type": SAFETENSORS_MEDIA_TYPE, "Content-Length": str(total),
                     SHA256_HEADER: digest})
        receipt = self._parse(UploadReceipt, response)
        if receipt.sha256 and receipt.sha256 != digest:
            raise HubUnavailable("the hub received different bytes than were sent")
        return receipt


def _range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
