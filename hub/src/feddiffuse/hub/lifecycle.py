"""The round lifecycle, driven around the store:

    pending --(enough clients enrolled)--> open --(all reported, or deadline with quorum,
    or admin close)--> closing --(aggregate, publish)--> closed, and the next round opens

An admin can always move a federation on. A participant whose token is revoked leaves the
round it has not reported in (whoever revoked it: this process, or the CLI beside it); a round
left with nobody who can report restarts with the clients enrolled now (same round number,
same base version); a round closed by the admin with no report keeps the global model and
opens the next round.

Aggregation replays the round's stored uploads into a fresh `RoundState` of the shared core
(`replay.py`). A round left `closing` by a crash is simply replayed again when the hub starts,
which gives the same bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from feddiffuse.shared.methods import plan_round
from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import ErrorCode
from feddiffuse.shared.seeds import training_seed

from .blobs import BlobStore
from .errors import HubError
from .layout import ModelLayout
from .privacy import budget_refusal, privacy_report
from .replay import replay_round
from .settings import FederationSettings
from .status import to_datetime
from .store import CLOSING, OPEN, HubStore
from .store.base import (
    FederationRow,
    NewEvent,
    ParticipantRow,
    RoundRow,
    SegmentFileRow,
    VersionRow,
)
from .testhooks import crash_point
from .weights import ALL_KEY, global_metadata, load_verified, single_threaded_torch, write_blob

log = logging.getLogger("feddiffuse.hub")

Clock = Callable[[], float]
AGGREGATION_RETRY_S = 30.0  # after a failed aggregation (e.g. a full disk), wait this long
REVOKED = "token revoked"


@dataclass(frozen=True)
class RoundView:
    """Who is in an open round, read once."""

    participants: list[ParticipantRow]
    reported: set[str]

    @property
    def removed(self) -> list[str]:
        return [p.client for p in self.participants if p.removed]

    @property
    def awaited(self) -> list[str]:
        """Participants that can still report."""
        return [p.client for p in self.participants
                if not p.removed and p.client not in self.reported]


def round_view(store: HubStore, round_index: int) -> RoundView:
    return RoundView(store.participants(round_index),
                     {u.client for u in store.uploads(round_index)})


class RoundLifecycle:
    def __init__(self, store: HubStore, blobs: BlobStore, layout: ModelLayout,
                 settings: FederationSettings, clock: Clock, lock: threading.RLock,
                 serving: Callable[[], bool],
                 build_segment_file: Callable[[VersionRow, str], SegmentFileRow]) -> None:
        self.store = store
        self.blobs = blobs
        self.layout = layout
        self.settings = settings
        self.clock = clock
        self._lock = lock  # state changes: open, commit upload, close, publish
        self._serving = serving
        self._build_segment_file = build_segment_file
        self._aggregating = threading.Lock()
        self._retry_at = 0.0
        self.aggregation_error: str | None = None
        self._noted: set[tuple[str, int]] = set()
        # Long-polling manifests: `generation` grows whenever a round opens or the federation
        # moves on; listeners (one per waiting request) are called from the thread that did it.
        self.generation = 0
        self.listeners: set[Callable[[], None]] = set()
        self._listeners_lock = threading.Lock()

    # -- listeners ---------------------------------------------------------------------------

    def add_listener(self, wake: Callable[[], None]) -> None:
        with self._listeners_lock:
            self.listeners.add(wake)

    def remove_listener(self, wake: Callable[[], None]) -> None:
        with self._listeners_lock:
            self.listeners.discard(wake)

    def wake_listeners(self) -> None:
        """Another process moved the federation on (a replicated hub's lease holder)."""
        self._moved_on()

    def _moved_on(self) -> None:
        """A round opened, restarted or was published: wake every long-polling manifest."""
        with self._listeners_lock:
            self.generation += 1
            listeners = list(self.listeners)
        for wake in listeners:
            wake()

    # -- moving on ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Move the rounds on if due: open a pending round, close one, redo an aggregation."""
        if self.advance():
            self._aggregate(self.store.federation().current_round)

    def due(self, quick: bool = False) -> bool:
        """Whether `advance` has anything to do: reads only, no lock, so that a request can
        ask without queueing behind uploads being committed. `quick`: only what time or an
        admin's enrolment moves (a pending round, a closing one, a passed deadline), in O(1)
        reads, without the round's participants and uploads: what uploads and revocations
        change is checked after each upload or admin request and by the background tick."""
        if not self._serving():
            return False
        fed = self.store.federation()
        if fed.finished:
            return False
        row = self.store.round(fed.current_round)
        if row is None:
            if ("budget", fed.current_round) in self._noted:
                return False  # refused for the privacy budget, which only ever shrinks
            return (len(self.store.enrolled_clients()) >= self.settings.min_clients
                    or ("pending", fed.current_round) not in self._noted)
        if row.status != OPEN:
            return True
        if quick:
            return row.deadline is not None and self.clock() >= row.deadline
        view = round_view(self.store, row.round)
        if not view.awaited or (row.deadline is not None and self.clock() >= row.deadline):
            return True
        active = set(self.store.enrolled_clients())
        return any(c not in active for c in view.awaited)

    def advance(self) -> bool:
        """The quick part of `tick` (open, drop revoked participants, restart, mark closing).
        Returns whether the current round is closing and awaits its aggregation."""
        if not self.due():
            return False
        moved = False
        with self._lock:
            if not self._serving():
                return False
            fed = self.store.federation()
            if fed.finished:
                return False
            row = self.store.round(fed.current_round)
            if row is None:
                moved = self._open_round(fed)
                closing = False
            elif row.status == OPEN:
                view = self._drop_revoked(row)
                reason = self._close_reason(row, view)
                if reason is not None:
                    self._mark_closing(row, reason)
                elif not view.awaited and not view.reported:
                    moved = self._restart(row, view)
                closing = reason is not None
            else:
                closing = True
        if moved:
            self._moved_on()
        return closing

    def close_round_now(self) -> None:
        """The admin closes the current round: it aggregates whatever has been reported; with
        no report the global model is kept and the next round opens."""
        with self._lock:
            fed = self._unfinished()
            row = self._current_row(fed)
            if row.status == OPEN:
                n = len(self.store.uploads(row.round))
                self._mark_closing(row, "closed by the admin" if n else
                                   "closed by the admin with no report; the global model is "
                                   "kept")
            self._retry_at = 0.0
        self._aggregate(row.round)

    def extend_round(self, seconds: float) -> None:
        """Push the current round's deadline back (from now if it has passed or is unset)."""
        with self._lock:
            fed = self._unfinished()
            row = self._current_row(fed)
            if row.status != OPEN:
                raise HubError(ErrorCode.ROUND_CLOSED, f"round {row.round} is already closing")
            now = self.clock()
            deadline = max(row.deadline or now, now) + seconds
            message = (f"round {row.round}: deadline extended by {seconds:g} s to "
                       f"{to_datetime(deadline).isoformat(timespec='seconds')}")
            self.store.set_deadline(row.round, deadline,
                                    NewEvent(now, row.round, "extended", message))
            self._noted.discard(("quorum", row.round))
        log.info(message)

    def _unfinished(self) -> FederationRow:
        fed = self.store.federation()
        if fed.finished:
            raise HubError(ErrorCode.FEDERATION_FINISHED,
                           f"the federation finished after {fed.current_round} rounds")
        return fed

    def _current_row(self, fed: FederationRow) -> RoundRow:
        row = self.store.round(fed.current_round)
        if row is None:
            raise HubError(ErrorCode.CONFLICT, f"round {fed.current_round} has not opened yet: "
                           f"it waits for {self.settings.min_clients} enrolled client(s) "
                           "(feddiffuse-hub token create)")
        return row

    def _drop_revoked(self, row: RoundRow) -> RoundView:
        """Take participants whose token was revoked out of the round (if not reported)."""
        view = round_view(self.store, row.round)
        awaited = view.awaited
        if not awaited:
            return view
        active = set(self.store.enrolled_clients())
        gone = [c for c in awaited if c not in active]
        if not gone:
            return view
        now = self.clock()
        message = (f"round {row.round}: {', '.join(gone)} removed ({REVOKED}); "
                   f"{len(awaited) - len(gone)} participant(s) can still report")
        if self.store.remove_participants(row.round, gone, REVOKED, now,
                                          NewEvent(now, row.round, "removed", message)):
            log.info(message)
        return round_view(self.store, row.round)

    def _close_reason(self, row: RoundRow, view: RoundView) -> str | None:
        reported = view.reported
        if not reported:
            return None
        quorum = self.settings.min_clients
        removed = view.removed
        if not view.awaited:
            if not removed:
                return "every participant reported"
            if len(reported) >= quorum:
                return (f"every remaining participant reported ({len(reported)} of "
                        f"{len(view.participants)}; {len(removed)} removed: {REVOKED})")
            self._note_once("quorum-lost", row.round, (
                f"round {row.round}: the quorum of {quorum} can no longer be met: "
                f"{len(reported)} reported and nobody else can ({', '.join(removed)} removed: "
                f"{REVOKED}); the admin can close it with what it has"))
            return None
        if row.deadline is not None and self.clock() >= row.deadline:
            if len(reported) >= quorum:
                return f"deadline passed with {len(reported)} report(s)"
            self._note_once("quorum", row.round, (
                f"round {row.round}: deadline passed with {len(reported)} of the {quorum} "
                "reports the quorum needs; waiting"))
        return None

    def _note_once(self, kind: str, round_index: int, message: str) -> None:
        if (kind, round_index) not in self._noted:
            self._noted.add((kind, round_index))
            self._event(round_index, kind, message)

    def _mark_closing(self, row: RoundRow, reason: str) -> None:
        message = f"round {row.round} closing: {reason}"
        if self.store.mark_closing(row.round, reason, self.clock(),
                                   NewEvent(self.clock(), row.round, "closing", message)):
            log.info(message)

    def _plan(self, round_index: int, base_version: str,
              now: float) -> tuple[RoundRow, list[ParticipantRow]] | None:
        """Round `round_index` with the clients enrolled now, or None below the quorum."""
        s = self.settings
        clients = self.store.enrolled_clients()
        if len(clients) < s.min_clients or not clients:
            return None
        plans = plan_round(s.method, clients, round_index, s.seed)
        participants = [
            ParticipantRow(round_index, c, plan.download
                           if self.store.participated_before(c, round_index) else SEGMENTS,
                           plan.upload, training_seed(s.seed, round_index, c))
            for c, plan in plans.items()
        ]
        deadline = now + s.round_timeout_s if s.round_timeout_s else None
        return RoundRow(round_index, OPEN, base_version, now, deadline), participants

    def _opened_message(self, row: RoundRow, participants: list[ParticipantRow],
                        verb: str = "opened") -> str:
        deadline = (f", deadline {to_datetime(row.deadline).isoformat('T', 'seconds')}"
                    if row.deadline is not None else "")
        return (f"round {row.round}/{self.settings.rounds} {verb} with {len(participants)} "
                f"participant(s): {', '.join(p.client for p in participants)}{deadline}")

    def _open_round(self, fed: FederationRow) -> bool:
        now = self.clock()
        refused = budget_refusal(self.store, self.settings.privacy_settings, fed.current_round)
        if refused is not None:
            self._note_once("budget", fed.current_round, refused)
            return False
        planned = self._plan(fed.current_round, fed.current_version, now)
        if planned is None:
            self._note_once("pending", fed.current_round, (
                f"round {fed.current_round} waits for {self.settings.min_clients} enrolled "
                "client(s) to open"))
            return False
        row, participants = planned
        message = self._opened_message(row, participants)
        self.store.open_round(row, participants, NewEvent(now, row.round, "opened", message))
        log.info(message)
        self._prebuild(row, participants)
        return True

    def _restart(self, row: RoundRow, view: RoundView) -> bool:
        """Round `row` has nobody left who can report: start it again, same number and base,
        with the clients enrolled now (none of whom is in it yet: a removed one is revoked)."""
        now = self.clock()
        planned = self._plan(row.round, row.base_version, now)
        if planned is None:
            self._note_once("stalled", row.round, (
                f"round {row.round}: no participant can report ({', '.join(view.removed)} "
                f"removed: {REVOKED}); it restarts once {self.settings.min_clients} client(s) "
                "are enrolled"))
            return False
        fresh, participants = planned
        message = self._opened_message(fresh, participants, "restarted") + (
            f" (every earlier participant was removed: {REVOKED})")
        self.store.restart_round(row.round, participants, fresh.deadline,
                                 NewEvent(now, row.round, "restarted", message))
        for kind in ("quorum", "quorum-lost", "stalled"):
            self._noted.discard((kind, row.round))
        log.info(message)
        self._prebuild(fresh, participants)
        return True

    def _prebuild(self, row: RoundRow, participants: list[ParticipantRow]) -> None:
        vrow = self.store.version(row.base_version)
        for key in sorted({",".join(p.download) for p in participants} - {ALL_KEY}):
            if vrow is not None and self.store.segment_file(vrow.version, key) is None:
                self._build_segment_file(vrow, key)

    # -- aggregation -------------------------------------------------------------------------

    def _aggregate(self, round_index: int) -> None:
        if not self._aggregating.acquire(blocking=False):
            return  # another thread is at it
        try:
            if not self._serving():
                return
            row = self.store.round(round_index)
            if row is None or row.status != CLOSING or time.monotonic() < self._retry_at:
                return
            try:
                self._aggregate_and_publish(row)
                self.aggregation_error = None
            except Exception as exc:  # keep serving; the round stays closing and is retried
                self.aggregation_error = f"{type(exc).__name__}: {exc}"
                self._retry_at = time.monotonic() + AGGREGATION_RETRY_S
                log.exception("round %d: aggregation failed; retrying in %.0f s", round_index,
                              AGGREGATION_RETRY_S)
        finally:
            self._aggregating.release()

    def _aggregate_and_publish(self, row: RoundRow) -> None:
        s = self.settings
        started = time.perf_counter()
        r = row.round
        delta = None
        if self.store.uploads(r):
            version, size, count, delta = replay_round(self.store, self.blobs, self.layout, s,
                                                       row)
            sample = self._update_sample_model(version, r + 1)
        else:  # closed with no report: nothing learned, the global (and its EMA) stay
            base = self.store.version(row.base_version)
            assert base is not None
            version, size, count, sample = base.version, base.bytes, 0, None
        crash_point("publish")
        now = self.clock()
        seconds = time.perf_counter() - started
        with self._lock:
            refused = None if r >= s.rounds else budget_refusal(
                self.store, s.privacy_settings, r + 1, releasing=1 if count else 0)
            # A spent privacy budget ends the federation: no later round may open, and the
            # clients then fetch this model as the final one instead of waiting for ever.
            finished = r >= s.rounds or refused is not None
            planned = None if finished else self._plan(r + 1, version, now)
            what = (f"aggregated {count} update(s) in {seconds:.2f} s; global version "
                    f"{version[:12]}..." if count else
                    f"no update; the global version stays {version[:12]}...")
            events = [NewEvent(now, r, "closed", f"round {r} closed: {what}"
                               f"{self._privacy_note(count)}")]
            if refused is not None:
                self._noted.add(("budget", r + 1))
                events.append(NewEvent(now, r + 1, "budget", refused))
            if finished:
                events.append(NewEvent(now, r, "finished", f"federation finished after {r} "
                                       f"rounds; final global version {version[:12]}..."
                                       + ("" if refused is None else
                                          f" (of {s.rounds} planned: the privacy budget "
                                          "allows no more)")))
            elif planned is not None:
                events.append(NewEvent(now, r + 1, "opened",
                                       self._opened_message(*planned)))
            self.store.publish(r, VersionRow(version, r + 1, size, now), now, finished,
                               planned, events,
                               None if sample is None
                               else VersionRow(sample[0], r + 1, sample[1], now),
                               () if delta is None else (delta,))
        for e in events:
            log.info(e.message)
        if planned is not None:
            self._prebuild(*planned)
        self._moved_on()
        if planned is None and not finished:
            self.tick()  # logs that the next round waits for clients

    def _privacy_note(self, count: int) -> str:
        """What a round just aggregated did for privacy, for its "closed" event."""
        privacy = self.settings.privacy_settings
        if privacy is None:
            return ""
        if not count:
            return "; nothing released, no privacy spent"
        report = privacy_report(self.store, privacy)
        assert report is not None
        who = ("the hub added Gaussian noise of std "
               f"{privacy.noise_std:g} to the sum of clipped updates"
               if privacy.mode == "central" else "the clients added the noise to their uploads")
        return (f"; {privacy.mode} DP: {who} (noise: {privacy.noise}); epsilon "
                f"{report.next_round_epsilon:.4g} at delta {privacy.delta:g} spent after "
                f"{report.rounds_released + 1} released round(s)")

    def _update_sample_model(self, version: str, round_index: int) -> tuple[str, int] | None:
        """The recipe's EMA of the global model, advanced by the new global `version`, as a
        blob (not yet published); None when the recipe keeps no EMA. Computed from the stored
        EMA and the new global alone, so an aggregation redone after a crash gives the same
        bytes."""
        decay = self.settings.training_recipe.ema_decay
        if decay is None:
            return None
        from feddiffuse.shared.recipes import update_ema

        previous = self.store.federation().sample_version
        with single_threaded_torch():
            ema = None if previous is None else load_verified(self.blobs, previous)
            ema = update_ema(ema, load_verified(self.blobs, version), decay)
            return write_blob(self.blobs, ema, {**global_metadata(self.settings.preset,
                                                                  round_index),
                                                "kind": "global-ema", "ema_decay": decay})

    def _event(self, round_index: int | None, kind: str, message: str) -> None:
        self.store.add_event(NewEvent(self.clock(), round_index, kind, message))
        log.info(message)
