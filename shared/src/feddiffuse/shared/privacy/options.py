"""The --dp options shared by `feddiffuse-hub init`, `feddiffuse simulate` and `experiment`."""

from __future__ import annotations

from ..errors import UserError
from .settings import PrivacySettings

DP_HELP = ("Client-level differential privacy (DP-FedAvg): 'central' (the hub adds the noise "
           "to the sum of clipped updates) or 'local' (each client noises its own update "
           "before upload). Default: none.")
DP_CLIP_HELP = "DP: the L2 norm C each client's whole upload is clipped to."
DP_NOISE_HELP = "DP: the noise multiplier Z; the Gaussian noise's std is Z x C."
DP_DELTA_HELP = "DP: the delta of the (epsilon, delta) guarantee, e.g. 1e-5."
DP_BUDGET_HELP = ("DP: the epsilon budget; no round opens that would spend more (default: "
                  "none, epsilon is only reported).")


def check_budget(privacy: PrivacySettings | None, rounds: int) -> int:
    """How many of `rounds` rounds the budget allows; UserError when it allows none."""
    if privacy is None:
        return rounds
    from .accountant import rounds_within_budget, spent

    allowed = rounds_within_budget(privacy, rounds)
    if allowed == 0:
        raise UserError(f"--dp-epsilon-budget {privacy.epsilon_budget:g} does not allow a single "
                        f"round: one round spends epsilon {spent(privacy, 1):.4g} at delta "
                        f"{privacy.delta:g}; raise the budget or --dp-noise-multiplier.")
    return allowed
