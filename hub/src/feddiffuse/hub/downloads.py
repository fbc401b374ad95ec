"""Serving model files over HTTP: ETag, If-None-Match, If-Range and one byte range (RFC 9110)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from feddiffuse.shared.protocol import CONTENT_SHA256_HEADER, SAFETENSORS_MEDIA_TYPE, ErrorCode

from .errors import HubError
from .services import ServedFile

CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_ETAGS = re.compile(r'(?:W/)?"[^"]*"|\*')


@dataclass(frozen=True)
class ByteRange:
    start: int
    stop: int  # exclusive

    @property
    def length(self) -> int:
        return self.stop - self.start


def _position(digits: str) -> int:
    """A byte position from a Range: int() refuses over 4300 digits, and past 10**18 is past
    the end of any file anyway."""
    digits = digits.lstrip("0")
    return int(digits or "0") if len(digits) <= 18 else 10**18


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match semantics: weak comparison against a list of tags, or '*'."""
    if header is None:
        return False
    tags = _ETAGS.findall(header)  # tags are quoted and may hold commas (ours do)
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def requested_range(range_header: str | None, if_range: str | None, etag: str,
                    size: int) -> ByteRange | None:
    """The single range to serve, or None for the whole file.

    A malformed Range or one with several ranges is ignored (the whole file is served, as
    RFC 9110 allows); a stale If-Range also means the whole file. A range past the end raises
    RANGE_NOT_SATISFIABLE.
    """
    if range_header is None or (if_range is not None and if_range.strip() != etag):
        return None
    m = _RANGE.fullmatch(range_header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    unsatisfiable = HubError(ErrorCode.RANGE_NOT_SATISFIABLE,
                             f"the range {range_header.strip()!r} lies outside the "
                             f"{size}-byte file", {"Content-Range": f"bytes */{size}"})
    if first == "":  # the last N bytes
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return ByteRange(max(0, size - suffix), size)
    start = _position(first)
    if last != "" and _position(last) < start:
        return None
    if start >= size:
        raise unsatisfiable
    stop = size if last == "" else min(_position(last) + 1, size)
    return ByteRange(start, stop)


class CountedStreamingResponse(StreamingResponse):
    """A streamed file that reports, when it ends however it ends, how many of its bytes
    were handed to the connection while the client was still there."""

    def __init__(self, content: Iterator[bytes], on_sent: Callable[[int], None],
                 **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self._on_sent = on_sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0
        gone = False

        async def watching_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def counting_send(message: Message) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body" and not gone:
                sent += len(message.get("body", b""))

        try:
            await super().__call__(scope, watching_receive, counting_send)
        finally:
            self._on_sent(sent)


def file_response(served: ServedFile, byte_range: ByteRange | None, *, head: bool,
                  on_sent: Callable[[int], None] | None = None) -> Response:
    headers = {"ETag": served.etag, "Accept-Ranges": "bytes",
               CONTENT_SHA256_HEADER: served.sha256,
               "Cache-Control": "private, max-age=31536000, immutable"}
    if byte_range is None:
        status, start, stop = 200, 0, served.size
    else:
        status, start, stop = 206, byte_range.start, byte_range.stop
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{served.size}"
    headers["Content-Length"] = str(stop - start)
    if head:
        return Response(status_code=status, headers=headers, media_type=SAFETENSORS_MEDIA_TYPE)
    return CountedStreamingResponse(served.blobs.iter_range(served.sha256, start, stop),
                                    on_sent or (lambda n: None), status_code=status,
                                    headers=headers, media_type=SAFETENSORS_MEDIA_TYPE)


def not_modified(served: ServedFile) -> Response:
    return Response(status_code=304, headers={"ETag": served.etag,
                                              CONTENT_SHA256_HEADER: served.sha256})
