"""A federation's settings, fixed at `init` (its seeds: feddiffuse.shared.seeds)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from pydantic import ValidationError

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.privacy import PrivacySettings
from feddiffuse.shared.recipes import DEFAULT_RECIPE, Recipe, get_recipe, recipe_from_dict

if TYPE_CHECKING:
    from feddiffuse.shared.payloads import LinkCodecs

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


@dataclass(frozen=True)
class FederationSettings:
    name: str
    preset: str
    method: str
    rounds: int
    local_epochs: int
    min_clients: int = 1  # the quorum: reports needed to close a round at its deadline
    round_timeout_s: float | None = None  # None: a round waits for every participant
    seed: int = 0  # initial weights, USplit pairs and the clients' training seeds
    batch_size: int | None = None  # None: the recipe's, else the preset's default
    lr: float | None = None  # None: the recipe's
    loss: str | None = None  # None: the recipe's
    # A built-in recipe's name, or (once validated, and as stored) the whole recipe as a dict,
    # so that a hub keeps training the way it was created even if a built-in one changes.
    recipe: str | dict = field(default=DEFAULT_RECIPE)
    uplink_codec: str = "fp32"  # feddiffuse.shared.codecs: how clients encode their updates
    downlink_codec: str = "fp32"  # how the hub sends models (lossy: updates from round 2)
    # Differential privacy (feddiffuse.shared.privacy.PrivacySettings as a dict); None: none.
    privacy: dict | None = None

    def validated(self) -> FederationSettings:
        """These settings with defaults resolved; raises UserError on a bad value."""
        # Imported here: the model and diffusion modules load PyTorch, which the store and
        # the token commands do not need.
        from feddiffuse.shared.methods import check_method
        from feddiffuse.shared.model import get_preset

        preset = get_preset(self.preset)
        check_method(self.method)
        if not _NAME.fullmatch(self.name):
            raise UserError("A federation name has 1 to 64 letters, digits, spaces, '.', '_' "
                            "or '-', starting with a letter or digit; pass --name.")
        if self.rounds < 1:
            raise UserError("--rounds must be at least 1.")
        if self.local_epochs < 1:
            raise UserError("--local-epochs must be at least 1.")
        if self.min_clients < 1:
            raise UserError("--min-clients must be at least 1.")
        if self.round_timeout_s is not None and not (
                math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise UserError("--round-timeout must be a positive number of seconds.")
        if not 0 <= self.seed < 2**63:
            raise UserError("--seed must be a non-negative integer.")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError("--lr must be a positive number.")
        links = self.links
        if self.privacy is not None:
            try:
                PrivacySettings.model_validate(self.privacy)
            except ValidationError as exc:
                raise UserError(f"Bad privacy settings: {exc.errors()[0]['msg']}; check the "
                                "--dp options.") from None
        base = (recipe_from_dict(self.recipe) if isinstance(self.recipe, dict)
                else get_recipe(self.recipe))
        recipe = base.with_overrides(lr=self.lr, loss=self.loss, batch_size=self.batch_size)
        batch = recipe.batch_size or preset.batch_size
        recipe = replace(recipe, batch_size=batch)
        return FederationSettings(**{**asdict(self), "batch_size": batch, "lr": recipe.lr,
                                     "loss": recipe.loss, "recipe": recipe.to_dict(),
                                     "uplink_codec": links.uplink.name,
                                     "downlink_codec": links.downlink.name})

    @property
    def links(self) -> LinkCodecs:
        """The codecs of both directions (UserError on an unknown name)."""
        from feddiffuse.shared.payloads import LinkCodecs  # loads PyTorch: see `validated`

        return LinkCodecs.parse(self.uplink_codec, self.downlink_codec)

    @property
    def training_recipe(self) -> Recipe:
        """The recipe (call on validated settings)."""
        if not isinstance(self.recipe, dict):
            return self.validated().training_recipe
        return recipe_from_dict(self.recipe)

    @property
    def privacy_settings(self) -> PrivacySettings | None:
        return None if self.privacy is None else PrivacySettings.model_validate(self.privacy)

    def to_dict(self) -> dict:
        return asdict(self)

