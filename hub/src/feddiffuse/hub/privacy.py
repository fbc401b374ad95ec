"""The hub's privacy budget: the epsilon spent so far, read from the store, and the refusal to
open a round that would go past the budget.

A round counts as released once it is closed with at least one report (a round closed with no
report publishes nothing new); the figure after k released rounds is the accountant's
(`feddiffuse.shared.privacy.accountant`). Nothing here is stored: it is recomputed from the
rounds, so it cannot drift from what was published. Closed rounds never change, so which of
them released something is remembered per store.
"""

from __future__ import annotations

import threading
import weakref

from feddiffuse.shared.privacy import PrivacyReport, PrivacySettings

from .store import CLOSED, HubStore

_released_by_store: weakref.WeakKeyDictionary[HubStore, dict[int, bool]] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def released_rounds(store: HubStore) -> list[int]:
    """The closed rounds that released a model aggregated from at least one report."""
    with _lock:
        known = _released_by_store.setdefault(store, {})
    out = []
    for row in store.rounds():
        if row.status != CLOSED:
            continue
        released = known.get(row.round)
        if released is None:
            released = bool(store.uploads(row.round))
            with _lock:
                known[row.round] = released
        if released:
            out.append(row.round)
    return out


def privacy_report(store: HubStore, settings: PrivacySettings | None) -> PrivacyReport | None:
    if settings is None:
        return None
    from feddiffuse.shared.privacy.accountant import privacy_report as report

    return report(settings, released_rounds(store))


def budget_refusal(store: HubStore, settings: PrivacySettings | None, round_index: int,
                   releasing: int = 0) -> str | None:
    """Why round `round_index` must not open (None: it may). `releasing`: rounds being
    published now, not yet closed in the store."""
    if settings is None or settings.epsilon_budget is None:
        return None
    from feddiffuse.shared.privacy.accountant import budget_refusal as refusal

    why = refusal(settings, len(released_rounds(store)) + releasing, round_index)
    if why is None:
        return None
    return (f"{why}; the federation cannot go on within its budget (its model can be "
            "exported: feddiffuse-hub export)")
