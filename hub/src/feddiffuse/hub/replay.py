"""Aggregating a round: its stored uploads replayed into the core's round state machine.

The hub does not keep a running sum across requests: at close it opens a fresh `RoundState`
(feddiffuse.shared.rounds) on the round's base version and folds in the stored uploads in the
canonical order (sorted by client id), loading one at a time, so memory is one model plus one
upload whatever the number of clients, and a replay after a crash gives the same bytes.
"""

from __future__ import annotations

from feddiffuse.shared.payloads import apply_downlink, delta_metadata
from feddiffuse.shared.rounds import RoundState

from .blobs import BlobStore
from .layout import ModelLayout
from .settings import FederationSettings
from .store import HubStore
from .store.base import RoundRow, SegmentFileRow
from .testhooks import crash_point
from .weights import (
    ALL_KEY,
    delta_key,
    global_metadata,
    load_decoded,
    load_verified,
    single_threaded_torch,
    write_blob,
    write_encoded_blob,
)


def replay_round(store: HubStore, blobs: BlobStore, layout: ModelLayout,
                 settings: FederationSettings, row: RoundRow
                 ) -> tuple[str, int, int, SegmentFileRow | None]:
    """Aggregate round `row` from its stored uploads and write the next global model as a
    blob (not yet published). Returns (version, bytes, number of uploads, and with a lossy
    downlink the blob of the update sent from `row.base_version`, to record once the version
    is published)."""
    r = row.round
    links = settings.links
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
            tensors = load_decoded(blobs, upload.sha256, links.uplink,
                                   layout.shapes_for(upload.segments))
            state.accept(upload.client, tensors, upload.num_samples, upload.bytes)
            del tensors  # one upload in memory at a time
        result = state.finalize()
        del state
        delta: SegmentFileRow | None = None
        if links.sends_deltas:  # the global model moves by the update as clients decode it
            new_global, wire = apply_downlink(base, result.global_state, links.downlink)
            version, size = write_blob(blobs, new_global, global_metadata(settings.preset, r + 1))
            sha, nbytes = write_encoded_blob(blobs, wire, delta_metadata(
                settings.preset, r + 1, version, row.base_version, ALL_KEY), links.downlink)
            delta = SegmentFileRow(version, delta_key(ALL_KEY, row.base_version), sha, nbytes)
            del new_global, wire
        else:
            version, size = write_blob(blobs, result.global_state,
                                       global_metadata(settings.preset, r + 1))
        del base
    return version, size, len(uploads), delta
