"""Loopback ports and waiting for a server to answer."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from .wait import poll_until


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, *, proc: subprocess.Popen | None = None, log: Path | None = None,
                 timeout: float = 90.0, verify: ssl.SSLContext | bool = True,
                 alive: Callable[[], bool] | None = None) -> None:
    """Wait until `GET url` answers 200; fail at once when `proc` exits (or `alive()` turns
    False), with the end of `log`, and after `timeout` seconds with a sentence."""
    def tail() -> str:
        return log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""

    def healthy() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{tail()}")
        if alive is not None and not alive():
            raise AssertionError(f"the server stopped:\n{tail()}")
        try:
            return httpx.get(url, timeout=2, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    poll_until(healthy, f"the server at {url} answers", timeout, interval=0.1, describe=tail)
