"""Checks on what the user types, shared by the command line and the terminal app.

Each check raises SetupError with one sentence that says what to do, and writes nothing.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from feddiffuse.shared.data.folder import walk_images

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
    """What an image folder holds, from file names and image headers (nothing is decoded).

    Up to `max_probe` headers are read (evenly spread); the counts of those are scaled to the
    whole folder when not every file was probed."""

    path: Path
    files: int = 0  # image files used (hidden and tool folders left out)
    usable: int = 0  # of the probed files, those whose header PIL can read
    probed: int = 0
    total_bytes: int = 0
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> count among probed
    skipped: Counter = field(default_factory=Counter)  # reason -> image files left out
    colour: int = 0  # probed images in colour
    grayscale: int = 0  # probed images in grayscale
    transparent: int = 0  # probed images with an alpha channel or transparency
    multi_frame: int = 0  # probed animations and multi-page files (only frame 1 is used)

    def _scaled(self, n: int) -> int:
        if self.probed == 0 or self.probed == self.files:
            return n
        return round(self.files * n / self.probed)

    @property
    def estimated_usable(self) -> int:
        return self._scaled(self.usable) if self.probed else 0

    @property
    def exact(self) -> bool:
        return self.probed == self.files

    def summary(self) -> str:
        """One line for people: how many images, how big, what dimensions, what was skipped."""
        notes = [f"{n:,} in {why} not used" for why, n in sorted(self.skipped.items())]
        if self.usable < self.probed:
            bad = self._scaled(self.probed - self.usable)
            notes.append(f"{'' if self.exact else 'about '}{bad:,} unreadable skipped")
        if self.files == 0:
            text = "no images here"
        else:
            count = self.estimated_usable
            approx = "" if self.exact else "about "
            text = f"{approx}{count:,} usable image{'s' if count != 1 else ''}"
            text += f", {_human_bytes(self.total_bytes)}"
            if self.sizes:
                (w, h), _n = self.sizes.most_common(1)[0]
                text += f", mostly {w}x{h}" if len(self.sizes) > 1 else f", {w}x{h}"
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def conversion_notes(self, image_size: int, channels: int) -> list[str]:
        """One plain sentence per kind of change the images go through before training."""
        lines = []
        approx = "" if self.exact else "about "
        side = f"{image_size}x{image_size}"
        if channels == 1 and self.colour:
            lines.append(f"{approx}{_count(self._scaled(self.colour), 'colour image')} "
                         "will be converted to grayscale.")
        if channels == 3 and self.grayscale:
            lines.append(f"{approx}{_count(self._scaled(self.grayscale), 'grayscale image')} "
                         "will be used as colour images with three equal channels.")
        resized = sum(n for (w, h), n in self.sizes.items() if (w, h) != (image_size, image_size))
        if resized:
            crop = sum(n for (w, h), n in self.sizes.items() if w != h)
            how = "resized and centre-cropped" if crop else "resized"
            lines.append(f"{approx}{_count(self._scaled(resized), 'image')} will be {how} to "
                         f"{side}.")
        if self.transparent:
            lines.append(f"{approx}{_count(self._scaled(self.transparent), 'image')} with "
                         "transparency will be laid on a white background.")
        if self.multi_frame:
            frames = _count(self._scaled(self.multi_frame), "animated or multi-page file")
            lines.append(f"{approx}{frames}: only the first frame is used.")
        return lines


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _is_colour(image) -> bool:
    if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(palette[i] != palette[i + 1] or palette[i] != palette[i + 2]
                   for i in range(0, len(palette) - 2, 3))
    return True


def scan_image_folder(path: str | Path, max_probe: int = 400) -> FolderScan:
    """Count the images under `path` (recursive) and read up to `max_probe` headers."""
    from PIL import Image, UnidentifiedImageError

    folder = check_folder_exists(path)
    candidates, skipped = walk_images(folder)
    scan = FolderScan(folder, files=len(candidates), skipped=skipped)
    for p in candidates:
        try:
            scan.total_bytes += p.stat().st_size
        except OSError:
            pass
    step = max(1, len(candidates) // max_probe) if candidates else 1
    for p in candidates[::step][:max_probe]:
        scan.probed += 1
        try:
            with Image.open(p) as image:
                scan.sizes[image.size] += 1
                if _is_colour(image):
                    scan.colour += 1
                else:
                    scan.grayscale += 1
                if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
                    scan.transparent += 1
                if getattr(image, "n_frames", 1) > 1:
                    scan.multi_frame += 1
                scan.usable += 1
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError,
                Image.DecompressionBombError):
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
    """The folder's scan, or SetupError when it holds no usable image."""
    scan = scan_image_folder(path)  # type: ignore[arg-type]
    if scan.files == 0:
        left_out = sum(scan.skipped.values())
        extra = (f" ({left_out} in hidden or thumbnail folders are not used)" if left_out
                 else "")
        raise SetupError(f"No images found in {scan.path}{extra}; choose a folder that "
                         "holds your images (PNG, JPEG, BMP, GIF, TIFF, WebP, ...).")
    if scan.usable == 0:
        raise SetupError(f"None of the images in {scan.path} could be read; choose a folder of "
                         "image files (PNG, JPEG, BMP, GIF, TIFF, WebP, ...).")
    return scan
