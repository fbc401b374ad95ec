"""`feddiffuse-hub status` as text."""

from __future__ import annotations

from datetime import datetime

from feddiffuse.shared.protocol import HubStatus


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _time(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "-"


def render_status(status: HubStatus, now: datetime) -> str:
    f = status.federation
    timeout = f"{f.round_timeout_s:g} s" if f.round_timeout_s else "none"
    lines = [
        f"Federation {f.name!r}: preset {f.preset} ({f.parameters['total']:,} parameters), "
        f"method {f.method}, {f.rounds} round(s) x {f.local_epochs} local epoch(s), "
        f"quorum {f.min_clients}, round timeout {timeout}, recipe {f.recipe}",
    ]
    if f.privacy is not None:
        p = f.privacy
        lines.append(f"Privacy: {p.settings.describe()}")
        per_round = ", ".join(f"r{h.round} {h.epsilon:.4g}" for h in p.history)
        lines.append(f"  epsilon spent: {p.epsilon:.4g}"
                     + (f" of {p.epsilon_budget:g}" if p.epsilon_budget is not None else "")
                     + f" after {p.rounds_released} released round(s)"
                     + (f" ({per_round})" if per_round else "")
                     + f"; the next round would bring it to {p.next_round_epsilon:.4g}")
    if f.finished:
        lines.append(f"State: finished after {f.current_round} round(s)"
                     + (f" of {f.rounds} planned." if f.current_round < f.rounds else "."))
    else:
        lines.append(f"State: round {f.current_round} of {f.rounds}.")
    c = status.current
    if c is not None:
        lines.append(f"Current round {c.round}: opened {_time(c.opened_at)}, from global "
                     f"version {c.global_version[:16]}...")
        if status.deadline is not None:
            left = (status.deadline - now).total_seconds()
            when = f"in {left:.0f} s" if left >= 0 else f"passed {-left:.0f} s ago"
            lines.append(f"  deadline:  {_time(status.deadline)} ({when})")
        else:
            lines.append("  deadline:  none (waits for every participant)")
        lines.append(f"  reported:  {len(c.reported)}/{len(c.participants)}: "
                     f"{_names(c.reported)}")
        lines.append(f"  missing:   {_names(c.missing)}")
        if status.waiting_for_quorum:
            lines.append(f"  WAITING FOR QUORUM: {len(c.reported)} of {f.min_clients} reports")
    if status.note:
        lines.append(status.note)
    lines.append("")
    lines.append("History:")
    if not status.history:
        lines.append("  (no round closed yet)")
    else:
        lines.append(f"  {'round':>5}  {'participants':>12}  {'reported':>8}  {'bytes in':>11}  "
                     f"{'bytes out':>11}  {'mean loss':>9}  closed")
        for h in status.history:
            loss = f"{h.mean_loss:.4f}" if h.mean_loss is not None else "-"
            lines.append(f"  {h.round:>5}  {len(h.participants):>12}  {len(h.reported):>8}  "
                         f"{_mb(h.bytes_in):>11}  {_mb(h.bytes_out):>11}  {loss:>9}  "
                         f"{_time(h.closed_at)}")
            if h.missing:  # closed at the deadline without them
                lines.append(f"  {'':>5}  missing: {_names(h.missing)}")
    return "\n".join(lines)
