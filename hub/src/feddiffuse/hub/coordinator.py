"""The hub, opened: one `Hub` per hub, with no HTTP in sight.

It composes the request services (`services.py`: tokens, downloads, upload admission) and
the round lifecycle (`lifecycle.py`) around one store and one blob store, and owns opening,
recovery after a crash and closing. The web app and the CLI call it.

An embedded hub (SQLite and a blob folder in its directory) is served by one process, under
a lock file. A replicated hub (PostgreSQL, and S3 or a shared folder) is served by any number
of processes, each answering any request; the one holding the lease (`PostgresLease`) runs
the round lifecycle, and another takes over within about a second when it dies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from feddiffuse.shared.privacy import PrivacyReport
from feddiffuse.shared.protocol import FederationInfo, HubStatus, Manifest, UploadReceipt

from . import status as status_view
from .backends import Backends
from .blobs import BlobStore, FolderBlobStore
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
from .store import HubStore
from .uploads import ReceivedUpload, UploadTicket
from .weights import header_prefix

__all__ = ["Caller", "Hub", "ServedFile"]

log = logging.getLogger("feddiffuse.hub")

Clock = Callable[[], float]
# A replicated hub's lease holder removes temporaries and unrecorded blobs only this old:
# younger ones may belong to an upload another replica is receiving or recording now.
STALE_BLOB_S = 3600.0


class Lease(Protocol):
    def held(self) -> bool: ...

    def refresh(self) -> bool: ...

    def release(self) -> None: ...


class Hub:
    """A hub, opened. With `serving`, it also drives the rounds (in a replicated hub: while
    it holds the lease)."""

    def __init__(self, paths: HubPaths | None, store: HubStore, *, clock: Clock = time.time,
                 serve_lock: ServeLock | None = None, blobs: BlobStore | None = None,
                 lease: Lease | None = None) -> None:
        self.paths = paths
        self.store = store
        if blobs is None:
            assert paths is not None
            blobs = FolderBlobStore(paths.blobs)
        self.blobs = blobs
        self.clock = clock
        self._serve_lock = serve_lock
        self._lease = lease
        self._lease_lock = threading.Lock()
        self._lease_was_held = False
        self._watched: tuple | None = None
        self._closed = False
        fed = store.federation()
        self.settings = fed.settings
        self.layout = ModelLayout.from_file_prefix(header_prefix(self.blobs, fed.current_version))
        lock = threading.RLock()  # state changes: open, commit upload, close, publish
        self.tokens = TokenService(store, clock)
        self.downloads = DownloadService(store, self.blobs, self.layout, self.settings)
        self.uploads = UploadService(store, self.blobs, self.layout, self.settings, clock, lock)
        self.rounds = RoundLifecycle(store, self.blobs, self.layout, self.settings, clock, lock,
                                     self._runs_lifecycle, self.downloads.build_segment_file)
        self._lock = lock

    @property
    def serving(self) -> bool:
        return (self._serve_lock is not None or self._lease is not None) and not self._closed

    @property
    def replicated(self) -> bool:
        return self._lease is not None

    def _runs_lifecycle(self) -> bool:
        """Whether this process drives the rounds now (serving, and holding the lease)."""
        return self.serving and (self._lease is None or self._lease.held())

    @classmethod
    def open(cls, root: str | Path | None, *, serve: bool = False, clock: Clock = time.time,
             backends: Backends | None = None) -> Hub:
        """Open a hub: its directory `root` (whose hub.json, if any, names its backends), or
        the `backends` alone. With `serve`: take the serve lock (embedded) or try for the
        lease (replicated), clean up after a crash (temporary files, unrecorded blobs), redo
        a cut-off aggregation, open a due round."""
        paths = None if root is None else HubPaths(Path(root))
        if backends is None:
            assert paths is not None
            backends = Backends.of(paths)
        if paths is None and (backends.store is None or backends.blobs is None):
            raise ValueError("a hub without a directory needs a store and a blob bucket")
        lock = ServeLock(paths) if serve and paths and not backends.replicated else None
        store: HubStore | None = None
        blobs: BlobStore | None = None
        lease: Lease | None = None
        try:
            store = backends.open_store(paths)
            blobs = backends.open_blobs(paths)
            if serve and backends.replicated:
                lease = store.lease()  # type: ignore[attr-defined]
            hub = cls(paths, store, clock=clock, serve_lock=lock, blobs=blobs, lease=lease)
        except BaseException:
            if lock is not None:
                lock.release()
            if store is not None:
                store.close()
            if blobs is not None:
                blobs.close()
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
            if self._lease is not None:
                self._lease.release()
            self.store.close()
            self.blobs.close()
            if self._serve_lock is not None:
                self._serve_lock.release()
                self._serve_lock = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        if not self.replicated:  # in a replicated hub: the lease holder, see _lease_changed
            self._remove_leftovers(None)
        loose = self.paths.loose_permissions() if self.paths is not None else None
        if loose and self.paths is not None:
            log.warning("%s can be read by other users (mode %s); it holds token hashes and "
                        "every upload: chmod 700 it", self.paths.root, loose)
        self.tick()

    def _remove_leftovers(self, older_than_s: float | None) -> None:
        temps = self.blobs.remove_temporaries(older_than_s)
        orphans = self.blobs.collect_garbage(self.store.referenced_blobs(), older_than_s)
        if temps or orphans:
            log.info("removed %d temporary file(s) and %d unrecorded blob(s) left by an "
                     "earlier stop", temps, orphans)

    def _refresh_lease(self) -> None:
        """A replicated hub: check the lease, or try to take it; log when that changes."""
        if self._lease is None or not self.serving:
            return
        held = self._lease.refresh()
        with self._lease_lock:
            changed, self._lease_was_held = held != self._lease_was_held, held
        if changed and held:
            log.info("this replica runs the round lifecycle now (it holds the lease)")
            try:
                self._remove_leftovers(STALE_BLOB_S)
            except Exception:
                log.exception("removing what an earlier stop left failed")
        elif changed:
            log.warning("this replica lost the lease; another runs the round lifecycle")

    def _watch(self) -> None:
        """A replica without the lease wakes its long-polling manifests when the holder has
        moved the federation on (it learns it from the store, once a second)."""
        fed = self.store.federation()
        row = self.store.round(fed.current_round)
        mark = (fed.current_round, fed.current_version, fed.finished_at,
                None if row is None else (row.opened_at, row.deadline, row.status))
        if self._watched is not None and mark != self._watched:
            self.rounds.wake_listeners()
        self._watched = mark

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
        self._refresh_lease()
        self.rounds.tick()

    def housekeeping(self) -> None:
        """The background task's extra step: write the download totals counted since (and in
        a replica without the lease, notice what the holder did)."""
        if self.serving:
            self.downloads.flush()
            if self._lease is not None and not self._lease.held():
                self._watch()

    def advance(self) -> bool:
        return self.rounds.advance()

    def due(self, quick: bool = False) -> bool:
        return self.rounds.due(quick)

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
