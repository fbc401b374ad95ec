"""The hub, opened: one `Hub` per hub directory, with no HTTP in sight.

It composes the request services (`services.py`: tokens, downloads, upload admission) and
the round lifecycle (`lifecycle.py`) around one store and one blob folder, and owns opening,
recovery after a crash and closing. The web app and the CLI call it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from feddiffuse.shared.privacy import PrivacyReport
from feddiffuse.shared.protocol import FederationInfo, HubStatus, Manifest, UploadReceipt

from . import status as status_view
from .blobs import BlobStore
from .layout import ModelLayout
from .lifecycle import RoundLifecycle
from .paths import HubPaths, ServeLock
from .privacy import privacy_report
from .services import (
    Caller,
    DownloadService,
    ServedFile,
    TokenService,
    UploadService,
)
from .store import HubStore, open_store
from .uploads import ReceivedUpload, UploadTicket
from .weights import header_prefix

__all__ = ["Caller", "Hub", "ServedFile"]

log = logging.getLogger("feddiffuse.hub")

Clock = Callable[[], float]


class Hub:
    """A hub directory, opened. With `serving`, it also drives the rounds (one process only)."""

    def __init__(self, paths: HubPaths, store: HubStore, *, clock: Clock = time.time,
                 serve_lock: ServeLock | None = None) -> None:
        self.paths = paths
        self.store = store
        self.blobs = BlobStore(paths.blobs)
        self.clock = clock
        self._serve_lock = serve_lock
        self._closed = False
        fed = store.federation()
        self.settings = fed.settings
        self.layout = ModelLayout.from_file_prefix(header_prefix(self.blobs, fed.current_version))
        lock = threading.RLock()  # state changes: open, commit upload, close, publish
        self.tokens = TokenService(store, clock)
        self.downloads = DownloadService(store, self.blobs, self.layout, self.settings)
        self.uploads = UploadService(store, self.blobs, self.layout, self.settings, clock, lock)
        self.rounds = RoundLifecycle(store, self.blobs, self.layout, self.settings, clock, lock,
                                     lambda: self.serving, self.downloads.build_segment_file)
        self._lock = lock

    @property
    def serving(self) -> bool:
        return self._serve_lock is not None and not self._closed

    @classmethod
    def open(cls, root: str | Path, *, serve: bool = False, clock: Clock = time.time) -> Hub:
        """Open a hub directory. With `serve`: take the serve lock, clean up after a crash
        (temporary files, unrecorded blobs), redo a cut-off aggregation, open a due round."""
        paths = HubPaths(Path(root)).require_hub()
        lock = ServeLock(paths) if serve else None
        try:
            hub = cls(paths, open_store(paths.db), clock=clock, serve_lock=lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if serve:
            hub.recover()
        return hub

    def close(self) -> None:
        # Same order as an aggregation takes them (it publishes under _lock): no deadlock.
        with self.rounds._aggregating, self._lock:
            if self._closed:
                return
            try:
                self.downloads.flush()
            except Exception:
                log.exception("writing the download totals failed")
            self._closed = True
            self.store.close()
            if self._serve_lock is not None:
                self._serve_lock.release()
                self._serve_lock = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        temps = self.blobs.remove_temporaries()
        orphans = self.blobs.collect_garbage(self.store.referenced_blobs())
        if temps or orphans:
            log.info("start: removed %d temporary file(s) and %d unrecorded blob(s) left by an "
                     "earlier stop", temps, orphans)
        loose = self.paths.loose_permissions()
        if loose:
            log.warning("%s can be read by other users (mode %s); it holds token hashes and "
                        "every upload: chmod 700 it", self.paths.root, loose)
        self.tick()

    # -- tokens -----------------------------------------------------------------------------

    def create_token(self, name: str) -> str:
        return self.tokens.create(name)

    def revoke_token(self, name: str) -> None:
        """Revoke a client's token; a serving hub takes it out of the current round at once
        (one that is not serving leaves that to the process that serves)."""
        self.tokens.revoke(name)
        self.rounds.advance()

    def identify(self, token: str) -> Caller:
        return self.tokens.identify(token)

    # -- what clients and the admin read ---------------------------------------------------

    def federation_info(self) -> FederationInfo:
        return status_view.federation_info(self.store.federation(), self.layout,
                                           self.privacy())

    def manifest(self, client: str) -> Manifest:
        return status_view.manifest(self.store, client, self.clock(), self.privacy())

    def status(self) -> HubStatus:
        return status_view.hub_status(self.store, self.layout, self.clock(),
                                      pending_bytes_out=self.downloads.pending_bytes_out(),
                                      aggregation_error=self.rounds.aggregation_error,
                                      privacy=self.privacy())

    def privacy(self) -> PrivacyReport | None:
        """The privacy settings and the epsilon spent so far (None: not a private one)."""
        return privacy_report(self.store, self.settings.privacy_settings)

    @property
    def generation(self) -> int:
        return self.rounds.generation

    def add_listener(self, wake: Callable[[], None]) -> None:
        self.rounds.add_listener(wake)

    def remove_listener(self, wake: Callable[[], None]) -> None:
        self.rounds.remove_listener(wake)

    # -- downloads and uploads --------------------------------------------------------------

    def model_file(self, version: str, segments: str | None, base: str | None = None
                   ) -> ServedFile:
        return self.downloads.model_file(version, segments, base)

    def prepare_upload(self, client: str, round_index: int) -> UploadTicket:
        return self.uploads.prepare(client, round_index)

    def commit_upload(self, ticket: UploadTicket, received: ReceivedUpload) -> UploadReceipt:
        return self.uploads.commit(ticket, received)

    # -- the round lifecycle ----------------------------------------------------------------

    def tick(self) -> None:
        """Move the rounds on if due: open a pending round, close one, redo an aggregation.
        Called at start, by the app's background task every second and after each request."""
        self.rounds.tick()

    def housekeeping(self) -> None:
        """The background task's extra step: write the download totals counted since."""
        if self.serving:
            self.downloads.flush()

    def advance(self) -> bool:
        return self.rounds.advance()

    def due(self) -> bool:
        return self.rounds.due()

    def close_round_now(self) -> HubStatus:
        self.rounds.close_round_now()
        return self.status()

    def extend_round(self, seconds: float) -> HubStatus:
        self.rounds.extend_round(seconds)
        return self.status()

    def export(self, out: str | Path, which: str = "sample") -> tuple[str, int]:
        """Copy a model to `out` (atomically); returns (version, bytes). `which` is "sample"
        (the model clients sample from: the recipe's EMA when it keeps one) or "global" (the
        last aggregate, the one training continues from)."""
        from feddiffuse.shared.wire import atomic_write_bytes

        fed = self.store.federation()
        version = fed.current_version
        if which == "sample" and fed.sample_version is not None:
            version = fed.sample_version
        data = self.blobs.read_bytes(version)
        atomic_write_bytes(out, data)
        return version, len(data)
