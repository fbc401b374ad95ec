"""Training recipes: every setting that decides how a federation trains, under one name.

A hub records its recipe in every manifest, so every client trains the same way; the
simulator takes the same recipes, so its numbers are the product's. Two are built in:

- ``paper``: the paper's protocol exactly (Adam lr 1e-4, a fresh optimiser each round, Huber
  loss, fp32, no schedule, no EMA). It reproduces the earlier default bit for bit.
- ``fast``: the product's default, the best measured on a CPU budget
  (``benchmarks/recipe.py``): AdamW at 2e-3 with a 100-step warm-up and a cosine decay over
  the whole federation, MSE with min-SNR weighting, bf16 autocast, batch 8, and each
  client's optimiser moments carried from one round to its next.

Also available to a custom recipe, measured and not in ``fast``: an EMA of the global model
kept by the hub across rounds (which clients then sample from), and a server step above 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # this module loads without PyTorch (the hub's store and CLI use it)
    import torch

    from .training import TrainConfig

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("huber", "mse")
LOSS_WEIGHTINGS = ("none", "min-snr")


def check_choices(settings) -> None:
    """The optimiser, schedule, loss and weighting of a recipe or a TrainConfig are known."""
    for label, value, choices in (("optimiser", settings.optimizer, OPTIMIZERS),
                                  ("learning-rate schedule", settings.lr_schedule, LR_SCHEDULES),
                                  ("loss", settings.loss, LOSSES),
                                  ("loss weighting", settings.loss_weighting, LOSS_WEIGHTINGS)):
        if value not in choices:
            raise UserError(f"Unknown {label} {value!r}; choose one of: {', '.join(choices)}.")


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    loss: str = "huber"
    loss_weighting: str = "none"
    bf16: bool = False
    channels_last: bool = True
    # The hub's EMA of the global model across rounds: ema = d * ema + (1 - d) * global,
    # started at the first aggregate. None: no EMA (clients sample the global model itself).
    ema_decay: float | None = None
    batch_size: int | None = None  # None: the preset's
    # The hub's step along the clients' weighted mean update (1.0: plain FedAvg).
    server_lr: float = 1.0
    # Each client carries its optimiser's moments from one round to its next (they never
    # travel); False: a fresh optimiser every round, as in the paper.
    keep_optimizer: bool = False

    def validate(self) -> Recipe:
        check_choices(self)
        if not self.lr > 0:
            raise UserError("--lr must be a positive number.")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1.")
        if not 0.0 < self.server_lr <= 10.0:
            raise UserError("The server learning rate must be above 0 and at most 10.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UserError("The EMA decay must be at least 0 and below 1.")
        return self

    def with_overrides(self, *, lr: float | None = None, loss: str | None = None,
                       bf16: bool | None = None, batch_size: int | None = None) -> Recipe:
        """This recipe with the settings a command line gave explicitly."""
        changes = {k: v for k, v in {"lr": lr, "loss": loss, "bf16": bf16,
                                     "batch_size": batch_size}.items() if v is not None}
        return replace(self, **changes).validate() if changes else self

    def to_dict(self) -> dict:
        return asdict(self)

    def aggregation(self, privacy=None):
        """A fresh aggregation strategy for one round (FedAvg with this server step; with
        `privacy`, a PrivacySettings, DP-FedAvg)."""
        from .aggregation import FedAvg

        if privacy is not None:
            from .aggregation.dp_fedavg import DPFedAvg

            return DPFedAvg(privacy, server_lr=self.server_lr)
        return FedAvg(server_lr=self.server_lr)

    def train_config(self, *, epochs: int, images: int, round_index: int, rounds: int,
                     batch_size: int, max_steps_per_epoch: int | None = None) -> TrainConfig:
        """The local training of one client in round `round_index` (1-based) of `rounds`.

        The learning-rate schedule runs over the whole federation in this client's own
        steps, so it depends only on the round, the recipe and the client's image count.
        """
        from .training import TrainConfig, epoch_steps

        per_epoch = epoch_steps(images, batch_size, max_steps_per_epoch)
        return TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=self.lr, loss=self.loss,
            channels_last=self.channels_last, bf16=self.bf16,
            max_steps_per_epoch=max_steps_per_epoch, optimizer=self.optimizer,
            weight_decay=self.weight_decay, loss_weighting=self.loss_weighting,
            warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
            step_offset=(round_index - 1) * epochs * per_epoch,
            total_steps=rounds * epochs * per_epoch, min_lr_ratio=self.min_lr_ratio)


PAPER = Recipe(name="paper")
FAST = Recipe(name="fast", optimizer="adamw", lr=2e-3, weight_decay=0.0, warmup_steps=100,
              lr_schedule="cosine", min_lr_ratio=0.1, loss="mse", loss_weighting="min-snr",
              bf16=True, ema_decay=None, batch_size=8, keep_optimizer=True)
RECIPES: dict[str, Recipe] = {r.name: r for r in (FAST, PAPER)}
DEFAULT_RECIPE = "fast"
RECIPE_HELP = ("Training recipe: 'fast' (the default: AdamW with warm-up and cosine decay, "
               "min-SNR MSE, bf16, batch 8, optimiser state carried across rounds) or "
               "'paper' (the paper's Adam 1e-4, fresh each round, Huber, fp32).")


def recipe_training_fields(recipe: Recipe) -> dict:
    """The recipe as the manifest's TrainingSettings fields (without epochs and seed)."""
    d = recipe.to_dict()
    return {"recipe": d.pop("name"), **{k: v for k, v in d.items() if k != "batch_size"},
            "batch_size": recipe.batch_size}


def recipe_from_training(settings) -> Recipe:
    """The recipe a manifest's TrainingSettings describe; raises UserError if unknown."""
    fields = {k: getattr(settings, k) for k in Recipe.__dataclass_fields__ if k != "name"}
    return Recipe(name=settings.recipe, **fields).validate()


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"Unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}.") \
            from None


def recipe_from_dict(data: dict) -> Recipe:
    """A recipe from its `to_dict` form (a manifest, a hub's settings); raises UserError."""
    known = set(Recipe.__dataclass_fields__)
    unknown = set(data) - known
    if unknown or "name" not in data:
        raise UserError(f"Not a training recipe: unknown fields {sorted(unknown)}.")
    return Recipe(**data).validate()


def update_ema(ema: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor],
               decay: float) -> dict[str, torch.Tensor]:
    """One EMA step over named tensors; the first call starts the EMA at `state`.

    The same float32 arithmetic in every process, so a hub and a simulator that see the same
    global models hold bit-identical EMAs.
    """
    import torch

    if ema is None:
        return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in state.items()}
    out = {}
    for n, t in state.items():
        prev = ema.get(n)
        t32 = t.detach().to("cpu", torch.float32)
        out[n] = t32.clone() if prev is None else prev * decay + t32 * (1.0 - decay)
    return out
