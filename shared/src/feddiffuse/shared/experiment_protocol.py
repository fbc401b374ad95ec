"""Evaluation protocols: every choice that decides how a run's models are scored, under one name.

- ``product`` (the default): what the product does and what a data owner really holds. DDIM
  50 steps with x_0 clipped; a personal-model client (udec, ulatdec) is scored on its
  *merged* model, the last global model with its own personal segments, which is the model
  its ``sample`` command draws from; the configured training recipe; CelebA in [-1, 1] with
  its pseudo-classes numbered female first.
- ``paper``: the authors' protocol exactly (handbook paper.md, sections 4-6, and the authors'
  code): ancestral DDPM over all 1,000 steps with no x_0 clipping; each personal-model
  client scored on its *last-local* model, the one it trained in the last round (decoder
  included, before any aggregate reached it), and the headline the mean over clients; the
  ``paper`` recipe (Adam 1e-4, a fresh optimiser each round, Huber, fp32); partition seed
  2023; CelebA in [0, 1] with the authors' class numbering (male 0-7, female 8-15).

A run records its protocol and every resolved setting in its report. Explicit settings win
over the protocol's (a report then says which ones differ).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError

PERSONAL_MODELS = ("merged", "last-local")
PERSONAL_MODEL_HELP = (
    "Which personal model of a udec/ulatdec client is scored: 'merged' (the last global "
    "model with the client's own segments: what a client holds and samples from; the "
    "product's default) or 'last-local' (the model the client trained in the last round, "
    "before the final aggregate: what the paper scored). Default: the protocol's.")
SAMPLER_HELP = ("ddim or ddpm (ancestral; all T steps, or respaced onto --steps). "
                "Default: the protocol's (product: ddim; paper: ddpm).")
STEPS_HELP = "Sampling steps (default: the protocol's: product 50, paper 1000)."
CLIP_HELP = ("Clip the predicted x0 to [-1, 1] at every step (default: the protocol's: "
             "product clips, paper does not).")


@dataclass(frozen=True)
class Protocol:
    name: str
    sampler: str
    steps: int
    clip_x0: bool
    personal_model: str
    recipe: str | None  # None: the run's configured recipe
    partition_seed: int | None  # None: the run's seed
    celeba_range: str
    celeba_classes: str
    summary: str

    def to_dict(self) -> dict:
        return asdict(self)


PRODUCT = Protocol(
    name="product", sampler="ddim", steps=50, clip_x0=True, personal_model="merged",
    recipe=None, partition_seed=None, celeba_range="[-1, 1]", celeba_classes="female-first",
    summary="DDIM 50 steps, x0 clipped; personal models as clients hold them (merged)")
PAPER = Protocol(
    name="paper", sampler="ddpm", steps=1000, clip_x0=False, personal_model="last-local",
    recipe="paper", partition_seed=2023, celeba_range="[0, 1]", celeba_classes="male-first",
    summary="the authors' protocol: DDPM 1000 steps, no x0 clipping; personal models as last "
            "trained locally, the mean over clients; the paper recipe; partition seed 2023; "
            "CelebA in [0, 1], male classes first")
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PRODUCT, PAPER)}
DEFAULT_PROTOCOL = "product"
PROTOCOL_HELP = (
    "Evaluation protocol: 'product' (the default: DDIM 50 with x0 clipping, personal models "
    "as clients hold them) or 'paper' (the authors' exactly: ancestral DDPM over 1,000 steps "
    "without clipping, each client's last locally trained model and the mean over clients, "
    "the paper recipe, partition seed 2023, CelebA in [0, 1] numbered male first). Explicit "
    "options win over the protocol's.")


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UserError(f"Unknown protocol {name!r}; choose one of: "
                        f"{', '.join(PROTOCOLS)}.") from None


def check_personal_model(name: str) -> str:
    if name not in PERSONAL_MODELS:
        raise UserError(f"Unknown personal model {name!r}; choose one of: "
                        f"{', '.join(PERSONAL_MODELS)}.")
    return name
