"""Checks on what the user types, shared by the command line and the terminal app.

Each check raises SetupError with one sentence that says what to do, and writes nothing.
"""

from __future__ import annotations

import ssl

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from feddiffuse.shared.data import IMAGE_EXTENSIONS

from .errors import SetupError

URL_EXAMPLE = "http://hub.example.org:8000"


def normalize_hub_url(text: str | None) -> str:
    """`text` as a canonical hub base URL (scheme, host, port, optional path; no trailing /)."""
    raw = (text or "").strip()
    if not raw:
        raise SetupError(f"No hub URL given; type the address of your hub, like {URL_EXAMPLE}.")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise SetupError(f"{raw!r} is not a valid hub URL; write it like {URL_EXAMPLE}.")
    if url.query or url.fragment:
        raise SetupError(f"{raw!r} is not a valid hub URL: leave out the '?' or '#' part.")
    if url.userinfo:
        raise SetupError(f"{raw!r} is not a valid hub URL: put no user name or password in it.")
    port = url.port
    if port is not None and not 0 < port < 65536:
        raise SetupError(f"{raw!r} is not a valid hub URL: the port must be 1 to 65535.")
    host = url.host if ":" not in url.host else f"[{url.host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = url.path.rstrip("/")
    return f"{url.scheme}://{netloc}{path}"


def check_token(token: str | None) -> str:
    value = (token or "").strip()
    if not value:
        raise SetupError("No token given; paste the token the hub operator gave you.")
    if any(c.isspace() for c in value) or not value.isprintable():
        raise SetupError("That token holds spaces or control characters; paste it again exactly.")
    return value


@dataclass
class FolderScan:
    """What an image folder holds, from file names and image headers (nothing is decoded)."""

    path: Path
    files: int = 0  # files with an image extension
    usable: int = 0  # of the probed files, those whose header PIL can read
    probed: int = 0
    total_bytes: int = 0
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> count among probed

    @property
    def estimated_usable(self) -> int:
        if self.probed == 0:
            return 0
        if self.probed == self.files:
            return self.usable
        return round(self.files * self.usable / self.probed)

    def summary(self) -> str:
        """One line for people: how many images, how big, what dimensions."""
        if self.files == 0:
            return "no PNG or JPEG images here"
        count = self.usable if self.probed == self.files else self.estimated_usable
        approx = "" if self.probed == self.files else "about "
        text = f"{approx}{count:,} usable image{'s' if count != 1 else ''}"
        text += f", {_human_bytes(self.total_bytes)}"
        if self.sizes:
            (w, h), n = self.sizes.most_common(1)[0]
            text += f", mostly {w}x{h}" if len(self.sizes) > 1 else f", {w}x{h}"
        if self.usable < self.probed:
            text += f" ({self.probed - self.usable} unreadable skipped)"
        return text


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def scan_image_folder(path: str | Path, max_probe: int = 400) -> FolderScan:
    """Count the images under `path` (recursive) and read up to `max_probe` headers."""
    from PIL import Image, UnidentifiedImageError

    folder = check_folder_exists(path)
    scan = FolderScan(folder)
    candidates: list[Path] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                p = Path(root) / name
                scan.files += 1
                try:
                    scan.total_bytes += p.stat().st_size
                except OSError:
                    pass
                candidates.append(p)
    candidates.sort()
    step = max(1, len(candidates) // max_probe) if candidates else 1
    for p in candidates[::step][:max_probe]:
        scan.probed += 1
        try:
            with Image.open(p) as image:
                scan.sizes[image.size] += 1
                scan.usable += 1
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
            continue
    return scan


def check_ca_cert(path: str | Path | None) -> Path | None:
    """The CA certificate file to trust for a hub, checked to load; None when none is given."""
    if path is None or not str(path).strip():
        return None
    cert = Path(str(path).strip()).expanduser()
    if not cert.is_file():
        raise SetupError(f"The CA certificate {cert} does not exist; give the PEM file of the "
                         "authority that signed the hub's certificate.")
    try:
        ssl.create_default_context(cafile=str(cert))
    except (ssl.SSLError, OSError, ValueError):
        raise SetupError(f"{cert} is not a PEM certificate file; give the PEM file of the "
                         "authority that signed the hub's certificate.") from None
    return cert.resolve()


def check_folder_exists(path: str | Path | None) -> Path:
    if path is None or not str(path).strip():
        raise SetupError("No image folder given; choose the folder that holds your images.")
    folder = Path(str(path).strip()).expanduser()
    if not folder.exists():
        raise SetupError(f"The folder {folder} does not exist; choose a folder of your images.")
    if not folder.is_dir():
        raise SetupError(f"{folder} is a file, not a folder; choose the folder that holds it.")
    return folder.resolve()


def check_image_folder(path: str | Path | None) -> FolderScan:
    """The folder's scan, or SetupError when it holds no usable PNG/JPEG image."""
    scan = scan_image_folder(path)  # type: ignore[arg-type]
    if scan.files == 0:
        raise SetupError(f"No PNG or JPEG images found in {scan.path}; choose a folder that "
                         "holds your images.")
    if scan.usable == 0:
        raise SetupError(f"None of the images in {scan.path} could be read; choose a folder of "
                         "PNG or JPEG files.")
    return scan
