"""What the hub tells: federation info, a client's manifest, the admin's status (read only)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from feddiffuse.shared.methods import shared_segments
from feddiffuse.shared.privacy import PrivacyReport
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
from .weights import ALL_KEY, delta_key

RETRY_AFTER_S = 5.0  # how soon a waiting client should ask again


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _maybe_datetime(t: float | None) -> datetime | None:
    return None if t is None else to_datetime(t)


def federation_info(fed: FederationRow, layout: ModelLayout,
                    privacy: PrivacyReport | None = None) -> FederationInfo:
    s = fed.settings
    return FederationInfo(name=s.name, preset=s.preset, method=s.method, rounds=s.rounds,
                          local_epochs=s.local_epochs, min_clients=s.min_clients,
                          round_timeout_s=s.round_timeout_s, current_round=fed.current_round,
                          finished=fed.finished, parameters=layout.parameter_counts(),
                          recipe=s.training_recipe.name, sample_version=fed.sample_version,
                          uplink_codec=s.uplink_codec, downlink_codec=s.downlink_codec,
                          privacy=privacy)


def delta_base(store: HubStore, fed: FederationRow) -> str | None:
    """The version the current one's update is sent from (a lossy downlink), if recorded."""
    if fed.settings.downlink_codec == "fp32":
        return None
    last = fed.current_round if fed.finished else fed.current_round - 1
    row = store.round(last) if last >= 1 else None
    if row is None or row.result_version != fed.current_version:
        return None
    recorded = store.segment_file(fed.current_version, delta_key(ALL_KEY, row.base_version))
    return row.base_version if recorded is not None else None


def manifest(store: HubStore, client: str, now: float,
             privacy: PrivacyReport | None = None) -> Manifest:
    fed = store.federation()
    s = fed.settings
    r = fed.current_round
    common: dict[str, Any] = dict(
        federation=s.name, client_id=client, round=r, rounds=s.rounds, method=s.method,
        preset=s.preset, global_version=fed.current_version, sample_version=fed.sample_version,
        uplink_codec=s.uplink_codec, downlink_codec=s.downlink_codec,
        delta_base=delta_base(store, fed), privacy=privacy)
    training = TrainingSettings(local_epochs=s.local_epochs,
                                **recipe_training_fields(s.training_recipe))
    if fed.finished:
        return Manifest(**common, phase=RoundPhase.FINISHED,
                        download_segments=list(shared_segments(s.method)), upload_segments=[],
                        training=training)
    row = store.round(r)
    plan = store.participant(r, client) if row is not None else None
    deadline = _maybe_datetime(row.deadline) if row is not None else None
    if row is None or plan is None or (plan.removed and store.upload(r, client) is None):
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


def round_summary(store: HubStore, row: RoundRow, bytes_out: Mapping[int, int]) -> RoundSummary:
    participants = [p.client for p in store.participants(row.round)]  # removed ones too
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


CLOSE_HOW = ("POST /api/v1/admin/rounds/current/close with the admin token, or "
             "`feddiffuse-hub round close DIR`")
EXTEND_HOW = ("POST /api/v1/admin/rounds/current/extend {\"seconds\": N}, or "
              "`feddiffuse-hub round extend DIR N`")


def _open_round_note(r: int, row: RoundRow, quorum: int, reported: list[str],
                     awaited: list[str], removed: list[str], enrolled: int, now: float) -> str:
    """What an open round waits for, and what the admin can do when it cannot get it."""
    gone = f" ({', '.join(removed)} removed: token revoked)" if removed else ""
    if not reported and not awaited:
        return (f"Round {r} has no participant left that can report{gone}; it restarts with "
                f"the enrolled clients once {quorum} are enrolled ({enrolled} now): "
                "`feddiffuse-hub token create DIR NAME`. Or close it with no report, which "
                f"keeps the global model and opens the next round: {CLOSE_HOW}.")
    if len(reported) + len(awaited) < quorum:
        what = ("close it with the reports it has" if reported else
                "close it with no report (the global model is kept, the next round opens)")
        return (f"Round {r} can no longer reach its quorum of {quorum}: {len(reported)} "
                f"reported and {len(awaited)} more can{gone}. The admin can {what}: "
                f"{CLOSE_HOW}.")
    past = row.deadline is not None and now >= row.deadline
    if past and len(reported) < quorum:
        what = ("with the reports it has" if reported
                else "with no report (the global model is kept)")
        return (f"Round {r} passed its deadline with {len(reported)} of the {quorum} reports "
                f"the quorum needs; waiting for {', '.join(awaited)}{gone}. The admin can "
                f"extend it ({EXTEND_HOW}) or close it now {what} ({CLOSE_HOW}).")
    return (f"Round {r} is open: {len(reported)} of {len(reported) + len(awaited)} "
            f"participant(s) reported{gone}.")


def hub_status(store: HubStore, layout: ModelLayout, now: float, *,
               pending_bytes_out: Mapping[int, int] | None = None,
               aggregation_error: str | None = None,
               privacy: PrivacyReport | None = None) -> HubStatus:
    """The admin's view, from the store (and what a serving hub holds in memory: download
    bytes not yet written, the last aggregation failure)."""
    fed = store.federation()
    s = fed.settings
    out = dict(store.bytes_out())
    for r, n in (pending_bytes_out or {}).items():
        out[r] = out.get(r, 0) + n
    rows = store.rounds()
    history = [round_summary(store, row, out) for row in rows if row.round != fed.current_round
               or fed.finished]
    current_row = None if fed.finished else store.round(fed.current_round)
    current = round_summary(store, current_row, out) if current_row is not None else None
    deadline = current_row.deadline if current_row is not None else None
    waiting = bool(current is not None and current_row is not None
                   and current_row.status == OPEN and deadline is not None
                   and now >= deadline and len(current.reported) < s.min_clients)
    r = fed.current_round
    if fed.finished:
        early = (f" of {s.rounds} planned (the privacy budget allows no more)"
                 if r < s.rounds else "")
        note = (f"The federation finished after {r} round(s){early}; the final global model is "
                f"version {fed.current_version[:12]}... (feddiffuse-hub export).")
    elif (current is None or current_row is None) and privacy is not None \
            and not privacy.budget_allows_next:
        from feddiffuse.shared.privacy.accountant import budget_refusal

        why = budget_refusal(privacy.settings, privacy.rounds_released, r) or ""
        note = (why[0].upper() + why[1:] + "; the federation cannot go on within its budget "
                "(feddiffuse-hub export writes its model).")
    elif current is None or current_row is None:
        enrolled = len(store.enrolled_clients())
        note = (f"Round {r} waits for clients: {enrolled} enrolled, it opens with at least "
                f"{s.min_clients} (feddiffuse-hub token create).")
    elif current_row.status == CLOSING:
        note = f"Round {r} is closing: aggregating {len(current.reported)} update(s)."
        if aggregation_error:
            note += f" The last attempt failed ({aggregation_error}); it is retried."
    else:
        participants = store.participants(r)
        reported = set(current.reported)
        awaited = [p.client for p in participants if not p.removed and p.client not in reported]
        removed = [p.client for p in participants if p.removed]
        note = _open_round_note(r, current_row, s.min_clients, current.reported, awaited,
                                removed, len(store.enrolled_clients()), now)
    return HubStatus(federation=federation_info(fed, layout, privacy), current=current,
                     deadline=_maybe_datetime(deadline), waiting_for_quorum=waiting,
                     history=history, note=note)
