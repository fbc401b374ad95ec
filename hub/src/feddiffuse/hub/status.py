"""What the hub tells: federation info, a client's manifest, the admin's status (read only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from feddiffuse.shared.methods import shared_segments
from feddiffuse.shared.protocol import (
    FederationInfo,
    HubStatus,
    Manifest,
    RoundPhase,
    RoundSummary,
    TrainingSettings,
)
from feddiffuse.shared.recipes import recipe_training_fields

from .layout import ModelLayout
from .store import CLOSING, OPEN, HubStore
from .store.base import FederationRow, RoundRow

if TYPE_CHECKING:
    from .coordinator import Hub

RETRY_AFTER_S = 5.0  # how soon a waiting client should ask again


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _maybe_datetime(t: float | None) -> datetime | None:
    return None if t is None else to_datetime(t)


def federation_info(fed: FederationRow, layout: ModelLayout) -> FederationInfo:
    s = fed.settings
    return FederationInfo(name=s.name, preset=s.preset, method=s.method, rounds=s.rounds,
                          local_epochs=s.local_epochs, min_clients=s.min_clients,
                          round_timeout_s=s.round_timeout_s, current_round=fed.current_round,
                          finished=fed.finished, parameters=layout.parameter_counts(),
                          recipe=s.training_recipe.name, sample_version=fed.sample_version)


def manifest(store: HubStore, client: str, now: float) -> Manifest:
    fed = store.federation()
    s = fed.settings
    r = fed.current_round
    common = dict(federation=s.name, client_id=client, round=r, rounds=s.rounds,
                  method=s.method, preset=s.preset, global_version=fed.current_version,
                  sample_version=fed.sample_version)
    training = TrainingSettings(local_epochs=s.local_epochs,
                                **recipe_training_fields(s.training_recipe))
    if fed.finished:
        return Manifest(**common, phase=RoundPhase.FINISHED,
                        download_segments=list(shared_segments(s.method)), upload_segments=[],
                        training=training)
    row = store.round(r)
    plan = store.participant(r, client) if row is not None else None
    deadline = _maybe_datetime(row.deadline) if row is not None else None
    if row is None or plan is None:
        return Manifest(**common, phase=RoundPhase.WAITING, download_segments=[],
                        upload_segments=[], training=training, deadline=deadline,
                        retry_after_s=RETRY_AFTER_S)
    if store.upload(r, client) is not None:
        phase = RoundPhase.REPORTED
    elif row.status == OPEN:
        return Manifest(**common, phase=RoundPhase.OPEN, download_segments=list(plan.download),
                        upload_segments=list(plan.upload),
                        training=training.model_copy(update={"seed": plan.seed}),
                        deadline=deadline)
    else:  # closing without this client's report: too late for this round
        phase = RoundPhase.WAITING
    return Manifest(**common, phase=phase, download_segments=[], upload_segments=[],
                    training=training, deadline=deadline, retry_after_s=RETRY_AFTER_S)


def round_summary(store: HubStore, row: RoundRow, bytes_out: dict[int, int]) -> RoundSummary:
    participants = [p.client for p in store.participants(row.round)]
    uploads = store.uploads(row.round)
    reported = [u.client for u in uploads]
    weighted = [(u.mean_loss, u.num_samples) for u in uploads if u.mean_loss is not None]
    mean_loss = (sum(loss * n for loss, n in weighted) / sum(n for _, n in weighted)
                 if weighted else None)
    return RoundSummary(round=row.round, participants=participants, reported=reported,
                        missing=sorted(set(participants) - set(reported)),
                        bytes_in=sum(u.bytes for u in uploads),
                        bytes_out=bytes_out.get(row.round, 0), mean_loss=mean_loss,
                        opened_at=to_datetime(row.opened_at),
                        closed_at=_maybe_datetime(row.closed_at),
                        global_version=row.base_version)


def hub_status(hub: Hub, now: float) -> HubStatus:
    store, s = hub.store, hub.settings
    fed = store.federation()
    out = store.bytes_out()
    rows = store.rounds()
    history = [round_summary(store, row, out) for row in rows if row.round != fed.current_round
               or fed.finished]
    current_row = None if fed.finished else store.round(fed.current_round)
    current = round_summary(store, current_row, out) if current_row is not None else None
    deadline = current_row.deadline if current_row is not None else None
    waiting = bool(current is not None and current_row.status == OPEN and deadline is not None
                   and now >= deadline and len(current.reported) < s.min_clients)
    r = fed.current_round
    if fed.finished:
        note = (f"The federation finished after {s.rounds} round(s); the final global model is "
                f"version {fed.current_version[:12]}... (feddiffuse-hub export).")
    elif current is None:
        enrolled = len(store.enrolled_clients())
        note = (f"Round {r} waits for clients: {enrolled} enrolled, it opens with at least "
                f"{s.min_clients} (feddiffuse-hub token create).")
    elif current_row.status == CLOSING:
        note = f"Round {r} is closing: aggregating {len(current.reported)} update(s)."
        if hub.aggregation_error:
            note += f" The last attempt failed ({hub.aggregation_error}); it is retried."
    elif waiting:
        note = (f"Round {r} passed its deadline with {len(current.reported)} of the "
                f"{s.min_clients} reports the quorum needs; waiting for more (or extend it).")
    else:
        note = (f"Round {r} is open: {len(current.reported)} of {len(current.participants)} "
                "participant(s) reported.")
    return HubStatus(federation=federation_info(fed, hub.layout), current=current,
                     deadline=_maybe_datetime(deadline), waiting_for_quorum=waiting,
                     history=history, note=note)
