"""The privacy settings of a federation (fixed at creation) and the report of what it spent.

Wire models (pydantic, no PyTorch): the hub carries them in the manifest and its status, the
simulator in its report.json. See the package docstring for what the numbers mean.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

PRIVACY_MODES: tuple[str, ...] = ("central", "local")
ACCOUNTANT = "rdp"  # dp-accounting's RdpAccountant
NOISE_SOURCE = "os-random"  # every draw from os.urandom, never from a seed


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacySettings(_Model):
    """Client-level DP-FedAvg: clip each upload to L2 norm `clip`, Gaussian noise of std
    `noise_multiplier * clip` on the sum (central) or on each upload (local)."""

    mode: Literal["central", "local"]
    clip: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    epsilon_budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    accountant: Literal["rdp"] = ACCOUNTANT
    noise: Literal["os-random"] = NOISE_SOURCE

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def describe(self) -> str:
        budget = (f", budget epsilon {self.epsilon_budget:g}" if self.epsilon_budget is not None
                  else ", no budget")
        return (f"{self.mode} DP: clip {self.clip:g}, noise multiplier "
                f"{self.noise_multiplier:g} (std {self.noise_std:g}, noise: {self.noise}), "
                f"delta {self.delta:g}{budget} ({self.accountant} accountant)")


class PrivacyRound(_Model):
    round: int
    epsilon: float  # spent after this round, all released rounds so far together


class PrivacyReport(_Model):
    """What a federation has spent: epsilon at `settings.delta` after each released round."""

    settings: PrivacySettings
    rounds_released: int  # rounds aggregated with at least one report
    epsilon: float  # spent so far (0 before the first release)
    epsilon_budget: float | None
    next_round_epsilon: float  # what releasing one more round would bring it to
    history: list[PrivacyRound] = Field(default_factory=list)

    @property
    def budget_allows_next(self) -> bool:
        return self.epsilon_budget is None or self.next_round_epsilon <= self.epsilon_budget

    def describe(self) -> str:
        budget = f" of budget {self.epsilon_budget:g}" if self.epsilon_budget is not None else ""
        return (f"epsilon {self.epsilon:.4g}{budget} at delta {self.settings.delta:g} after "
                f"{self.rounds_released} released round(s) ({self.settings.mode} DP)")


def privacy_from_options(dp: str | None, clip: float | None, noise_multiplier: float | None,
                         delta: float | None, epsilon_budget: float | None
                         ) -> PrivacySettings | None:
    """The settings the --dp options of a command line give; None without --dp. Raises
    UserError (one sentence) on a missing or bad value."""
    given = {"--dp-clip": clip, "--dp-noise-multiplier": noise_multiplier,
             "--dp-delta": delta, "--dp-epsilon-budget": epsilon_budget}
    if dp is None:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise UserError(f"{', '.join(extra)} need --dp central or --dp local.")
        return None
    if dp not in PRIVACY_MODES:
        raise UserError(f"Unknown --dp {dp!r}; choose central or local.")
    if clip is None:
        raise UserError(f"--dp {dp} needs --dp-clip C, the L2 norm each client's update is "
                        "clipped to.")
    if noise_multiplier is None:
        raise UserError(f"--dp {dp} needs --dp-noise-multiplier Z (the noise's std is Z x C).")
    if delta is None:
        raise UserError(f"--dp {dp} needs --dp-delta D, e.g. 1e-5 (well below 1 / the number "
                        "of clients).")
    if not (math.isfinite(clip) and clip > 0):
        raise UserError("--dp-clip must be a positive number.")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise UserError("--dp-noise-multiplier must be a positive number.")
    if not 0 < delta < 1:
        raise UserError("--dp-delta must be between 0 and 1 (exclusive).")
    if epsilon_budget is not None and not (math.isfinite(epsilon_budget)
                                           and epsilon_budget > 0):
        raise UserError("--dp-epsilon-budget must be a positive number.")
    return PrivacySettings.model_validate({"mode": dp, "clip": clip,
                                           "noise_multiplier": noise_multiplier,
                                           "delta": delta, "epsilon_budget": epsilon_budget})
