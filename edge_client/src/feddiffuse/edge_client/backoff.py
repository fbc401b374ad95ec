"""Retrying network calls: exponential backoff with jitter, forever unless told otherwise.

A laptop that sleeps or loses Wi-Fi looks to the client like refused connections, timeouts
and cut-off transfers. Those (HubUnavailable, DownloadCorrupt) are retried; everything else
(a rejected token, a round that moved on) goes straight to the caller.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import Cancelled, DownloadCorrupt, HubUnavailable

T = TypeVar("T")
RETRYABLE = (HubUnavailable, DownloadCorrupt)


@dataclass(frozen=True)
class Backoff:
    """Delays of initial * factor**attempt, capped at `maximum`, with +-`jitter` spread."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.5  # fraction of the delay drawn at random ("equal jitter")
    max_attempts: int | None = None  # None: forever

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry number `attempt` (1-based)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1.0 - self.jitter) + base * self.jitter * rng.random()


# (what was being done, attempt number, seconds until the next try, the error)
RetryCallback = Callable[[str, int, float, Exception], None]


def call_with_retry(fn: Callable[[], T], *, what: str, backoff: Backoff,
                    stop: threading.Event | None = None,
                    on_retry: RetryCallback | None = None,
                    rng: random.Random | None = None) -> T:
    """Call `fn` until it succeeds, waiting between failures; Cancelled when `stop` is set."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        if stop is not None and stop.is_set():
            raise Cancelled(f"stopped while {what}")
        try:
            return fn()
        except RETRYABLE as exc:
            attempt += 1
            if backoff.max_attempts is not None and attempt >= backoff.max_attempts:
                raise
            delay = backoff.delay(attempt, rng)
            hinted = getattr(exc, "retry_after", None)
            if hinted is not None:
                delay = min(max(delay, hinted), max(backoff.maximum, hinted))
            if on_retry is not None:
                on_retry(what, attempt, delay, exc)
            if stop is not None:
                if stop.wait(delay):
                    raise Cancelled(f"stopped while {what}") from None
            else:
                threading.Event().wait(delay)
