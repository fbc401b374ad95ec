"""Serving the app with uvicorn, with a bound on the time a connection may take to send its
request's headers (uvicorn has none: a client trickling headers, or connecting and sending
nothing, would hold its connection for ever). The body's idle time and the number of uploads
in progress are bounded in the app itself (app.py), whatever server runs it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from feddiffuse.shared.protocol import ErrorCode

from .limits import ServeLimits


def _timeout_answer(seconds: float) -> bytes:
    body = json.dumps({"code": ErrorCode.REQUEST_TIMEOUT.value,
                       "message": f"the request's headers did not arrive within {seconds:g} s"
                       }).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    `header_timeout_s`, counted from the connection's start, or on a kept-alive connection
    from the first byte of its next request. A kept-alive connection that stays idle is
    uvicorn's keep-alive timeout's to close, quietly (no 408 that no request asked for)."""

    header_timeout_s = ServeLimits.header_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # nothing of an answer written on it yet
            self.transport.write(_timeout_answer(self.header_timeout_s))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        first_bytes = self._header_timer is None and self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the headers are in
        elif first_bytes and data and not self.transport.is_closing():
            self._arm_header_timer()  # a kept-alive connection's next request has begun

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def http_protocol(limits: ServeLimits) -> type[HeaderTimeoutH11Protocol]:
    return type("HubH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout_s": limits.header_timeout_s})


def uvicorn_config(app: Any, limits: ServeLimits, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn Config for the hub's app, with `limits` applied to its connections."""
    return uvicorn.Config(app, http=http_protocol(limits),
                          timeout_keep_alive=limits.keep_alive_s, **kwargs)
