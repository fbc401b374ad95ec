"""Aggregating a round: its stored uploads replayed into the core's round state machine.

The hub does not keep a running sum across requests: at close it opens a fresh `RoundState`
(feddiffuse.shared.rounds) on the round's base version and folds in the stored uploads in the
canonical order (sorted by client id), loading one at a time, so memory is one model plus one
upload whatever the number of clients, and a replay after a crash gives the same bytes.
"""

from __future__ import annotations

from feddiffuse.shared.rounds import RoundState

from .blobs import BlobStore
from .layout import ModelLayout
from .settings import FederationSettings
from .store import HubStore
from .store.base import RoundRow
from .testhooks import crash_point
from .weights import global_metadata, load_verified, single_threaded_torch, write_blob


def replay_round(store: HubStore, blobs: BlobStore, layout: ModelLayout,
                 settings: FederationSettings, row: RoundRow) -> tuple[str, int, int]:
    """Aggregate round `row` from its stored uploads and write the next global model as a
    blob (not yet published). Returns (version, bytes, number of uploads)."""
    r = row.round
    participants = store.participants(r)
    uploads = store.uploads(r)  # sorted by client id: the canonical order
    with single_threaded_torch():
        base = load_verified(blobs, row.base_version)
        state = RoundState.open(settings.method, r, [p.client for p in participants], base,
                                layout.segment_of, settings.seed,
                                strategy=settings.training_recipe.aggregation(
                                    settings.privacy_settings))
        for p in participants:
            if state.plans[p.client].upload != p.upload:
                raise RuntimeError(f"round {r}: the stored assignment of {p.client} differs "
                                   "from the method's")
        for i, upload in enumerate(uploads):
            if i == len(uploads) // 2:
                crash_point("aggregate")
            tensors = load_verified(blobs, upload.sha256)
            state.accept(upload.client, tensors, upload.num_samples, upload.bytes)
            del tensors  # one upload in memory at a time
        result = state.finalize()
        del base, state
        version, size = write_blob(blobs, result.global_state,
                                   global_metadata(settings.preset, r + 1))
    return version, size, len(uploads)
