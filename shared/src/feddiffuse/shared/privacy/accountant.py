"""Privacy spent, from `dp-accounting`'s RDP accountant (never hand-written maths).

A released round is one Gaussian mechanism of noise multiplier Z on a sum of sensitivity C
(see the package docstring); every enrolled client may take part in every round, so rounds
compose without amplification by sampling (sampling probability 1). `rounds_sampled` with
q < 1 is there for a federation that samples its participants secretly; the hub does not.
"""

from __future__ import annotations

from functools import lru_cache

from .settings import PrivacyReport, PrivacyRound, PrivacySettings


def round_event(noise_multiplier: float, sampling_probability: float = 1.0):
    """The dp-accounting event of one round."""
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_probability >= 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(sampling_probability, gaussian)


@lru_cache(maxsize=4096)
def epsilon_after(noise_multiplier: float, delta: float, rounds: int,
                  sampling_probability: float = 1.0) -> float:
    """Epsilon at `delta` after `rounds` rounds (0 for none)."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(round_event(noise_multiplier, sampling_probability), rounds)
    return float(accountant.get_epsilon(delta))


def spent(settings: PrivacySettings, rounds: int) -> float:
    return epsilon_after(settings.noise_multiplier, settings.delta, rounds)


def rounds_within_budget(settings: PrivacySettings, limit: int) -> int:
    """How many rounds (at most `limit`) the budget allows."""
    if settings.epsilon_budget is None:
        return limit
    n = 0
    while n < limit and spent(settings, n + 1) <= settings.epsilon_budget:
        n += 1
    return n


def privacy_report(settings: PrivacySettings, released: list[int]) -> PrivacyReport:
    """The report after the rounds `released` (round numbers, in order)."""
    history = [PrivacyRound(round=r, epsilon=spent(settings, i + 1))
               for i, r in enumerate(released)]
    return PrivacyReport(settings=settings, rounds_released=len(released),
                         epsilon=spent(settings, len(released)),
                         epsilon_budget=settings.epsilon_budget,
                         next_round_epsilon=spent(settings, len(released) + 1),
                         history=history)


def budget_refusal(settings: PrivacySettings, released: int, round_index: int) -> str | None:
    """Why round `round_index` must not open after `released` released rounds, or None."""
    if settings.epsilon_budget is None:
        return None
    after = spent(settings, released + 1)
    if after <= settings.epsilon_budget:
        return None
    return (f"round {round_index} is not opened: releasing it would bring the privacy spent "
            f"to epsilon {after:.4g} at delta {settings.delta:g}, over the budget of "
            f"{settings.epsilon_budget:g} ({spent(settings, released):.4g} spent in "
            f"{released} round(s))")
