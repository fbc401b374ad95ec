"""How long and how much a serving hub waits for its clients: its defences against slow,
stalled or too many connections. Settings of `serve` (not of the federation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from feddiffuse.shared.errors import UserError


@dataclass(frozen=True)
class ServeLimits:
    # From a connection's start (or the end of its previous answer) to the end of the
    # request's headers; past it the connection is closed. Slow-header clients hold nothing.
    header_timeout_s: float = 10.0
    # Longest silence within a request body: a stalled upload is answered 408 and cut off.
    body_idle_timeout_s: float = 30.0
    # Uploads being received at once; one more is answered 503 with Retry-After.
    # (128 whole paper-fmnist uploads: 1.6 GB of temporary files, 128 MiB of batches.)
    max_uploads_in_progress: int = 128
    retry_after_s: int = 2  # what a 503 tells the client to wait
    # An idle connection between requests is closed after this, quietly. It must outlast the
    # clients' own keep-alive (httpx, the edge client's: 5 s, counted from a little later than
    # ours): a client then drops an idle connection before the hub does. With the two equal, a
    # client that reuses one idle ~5 s sends its request into the hub's close and gets a reset
    # (ReadError), never an answer; 100 uploads queued in one client's pool did, under load.
    keep_alive_s: int = 15

    def validated(self) -> ServeLimits:
        for name in ("header_timeout_s", "body_idle_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.removesuffix('_s').replace('_', '-')} must be a "
                                "positive number of seconds.")
        if self.max_uploads_in_progress < 1:
            raise UserError("--max-uploads must be at least 1.")
        if self.retry_after_s < 1 or self.keep_alive_s < 1:
            raise UserError("Retry-After and keep-alive must be at least 1 second.")
        return self
