"""The federated simulator: the whole loop in one process, with the product's own parts.

Every transfer goes through the wire codec (safetensors bytes, validated on decode), every
round through `RoundState`, every client's training through `train_local`: the same functions
the hub and the edge client use, so research numbers come from the product's code.

:func:`run_simulation` is a sequence of named pieces: the evaluator (resolved first, so a
missing feature network shows before any training), the clients' data, the initial model,
the rounds (each the architecture's five steps, see :func:`_run_round`), the saved weights,
the sample grid, the evaluation of the final models, and the report.
"""

from __future__ import annotations

import io
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .codecs import FP32, Codec, compress_with_feedback, decode_payload, write_payload
from .data import load_dataset, load_image_folder, partition_indices
from .data.celeba import authors_classes
from .data.partition import SPLITS
from .diffusion import DiffusionSchedule, SamplerSpec, make_generator, sample
from .errors import UserError
from .evaluation import DEFAULT_METRICS, PERSONAL_MODES, Evaluator, evaluate_models, parse_metrics
from .experiment_protocol import (
    DEFAULT_PROTOCOL,
    Protocol,
    check_personal_model,
    get_protocol,
)
from .images import save_grid
from .ledger import CommLedger
from .methods import check_method, has_personal_models, personal_segments
from .model import Preset, build_unet, count_parameters, get_preset, segment_map
from .payloads import (
    ALL_KEY,
    LinkCodecs,
    apply_downlink,
    apply_update,
    delta_metadata,
    global_metadata,
    initial_global,
    segment_metadata,
    upload_metadata,
    wire_subset,
)
from .privacy import PrivacySettings, privacy_from_options
from .privacy.accountant import privacy_report, spent
from .privacy.mechanism import privatize_upload
from .privacy.options import check_budget
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe, update_ema
from .rounds import RoundState, training_seed
from .training import TrainResult, select_device, train_local
from .wire import atomic_write_bytes, encode_tensors, save_weights, write_tensors

Log = Callable[[str], None]
Weights = dict[str, torch.Tensor]


@dataclass
class SimulationConfig:
    preset: str = "tiny"
    dataset: str = "fashion-mnist"
    method: str = "full"
    clients: int = 2
    rounds: int = 3
    local_epochs: int = 1
    split: str = "iid"
    beta: float = 0.5
    seed: int = 0
    partition_seed: int | None = None  # None: the protocol's (paper: 2023), else `seed`
    limit: int | None = None
    data_dir: str | None = None
    # A folder with one folder of images per client (as `feddiffuse partition --export`
    # writes, or as the data owners hold them): each client trains on its own folder, loaded
    # as the edge client loads it, and the client ids are the folder names. `dataset` then
    # only names the reference set for evaluation; `clients`, `split` and `limit` are unused.
    client_folders: str | None = None
    out: str = "runs/simulate"
    recipe: str | None = None  # None: the protocol's (paper: "paper"), else DEFAULT_RECIPE
    batch_size: int | None = None  # None: the recipe's, else the preset's default
    lr: float | None = None  # None: the recipe's
    loss: str | None = None  # None: the recipe's
    device: str = "auto"
    channels_last: bool = True
    bf16: bool | None = None  # None: the recipe's
    sample_count: int = 64  # images in samples.png (per personal model: one row)
    sample_steps: int | None = None  # steps of samples.png; None: the protocol's
    max_steps_per_epoch: int | None = None
    # Evaluation of the final model(s); 0 samples: none. See feddiffuse.shared.evaluation.
    eval_samples: int = 0  # per model ("each") or in total over personal models ("split")
    eval_steps: int | None = None  # None: the protocol's (product: 50, paper: 1000)
    eval_metrics: str = DEFAULT_METRICS
    eval_personal: str = "each"
    inception_weights: str | None = None
    # See feddiffuse.shared.experiment_protocol: "product" (the default) or "paper".
    protocol: str = DEFAULT_PROTOCOL
    sampler: str | None = None  # of the evaluation and samples.png; None: the protocol's
    clip_x0: bool | None = None  # None: the protocol's
    personal_model: str | None = None  # "merged" | "last-local"; None: the protocol's
    eval_every: int = 0  # also evaluate after every N rounds (a metric curve); 0: only the end
    uplink_codec: str = "fp32"  # feddiffuse.shared.codecs; error feedback on the clients
    downlink_codec: str = "fp32"  # lossy: updates from round 2 on (feddiffuse.shared.payloads)
    # Client-level differential privacy (feddiffuse.shared.privacy): None, "central", "local".
    dp: str | None = None
    dp_clip: float | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float | None = None
    dp_epsilon_budget: float | None = None

    def privacy(self) -> PrivacySettings | None:
        return privacy_from_options(self.dp, self.dp_clip, self.dp_noise_multiplier,
                                    self.dp_delta, self.dp_epsilon_budget)

    def resolved_protocol(self) -> Protocol:
        return get_protocol(self.protocol)

    def resolved_recipe(self) -> Recipe:
        """The recipe with this run's explicit overrides."""
        name = self.recipe or self.resolved_protocol().recipe or DEFAULT_RECIPE
        recipe = get_recipe(name).with_overrides(
            lr=self.lr, loss=self.loss, bf16=self.bf16, batch_size=self.batch_size)
        return replace(recipe, channels_last=self.channels_last)

    def resolved_partition_seed(self) -> int:
        if self.partition_seed is not None:
            return self.partition_seed
        protocol_seed = self.resolved_protocol().partition_seed
        return self.seed if protocol_seed is None else protocol_seed

    def eval_sampler(self) -> SamplerSpec:
        """The sampler of the evaluation images (and, with `sample_steps`, of samples.png)."""
        p = self.resolved_protocol()
        name = self.sampler or p.sampler
        steps = self.eval_steps if self.eval_steps is not None else (
            p.steps if name == p.sampler else SamplerSpec().steps if name == "ddim" else 1000)
        clip = self.clip_x0 if self.clip_x0 is not None else (
            p.clip_x0 if name == p.sampler else None)
        return SamplerSpec(name, steps, clip)

    def grid_sampler(self) -> SamplerSpec:
        spec = self.eval_sampler()
        return spec if self.sample_steps is None else replace(spec, steps=self.sample_steps)

    def resolved_personal_model(self) -> str:
        return check_personal_model(self.personal_model
                                    or self.resolved_protocol().personal_model)

    def resolved_settings(self) -> dict:
        """Every setting the protocol decides, as this run resolves them (for the report)."""
        p = self.resolved_protocol()
        return {"protocol": p.name, "sampler": self.eval_sampler().to_dict(),
                "samples_png_sampler": self.grid_sampler().to_dict(),
                "personal_model": self.resolved_personal_model(),
                "recipe": self.resolved_recipe().name,
                "partition_seed": self.resolved_partition_seed(),
                "celeba_range": p.celeba_range, "celeba_classes": p.celeba_classes}

    def links(self) -> LinkCodecs:
        return LinkCodecs.parse(self.uplink_codec, self.downlink_codec)

    def validate(self) -> None:
        get_preset(self.preset)
        self.links()
        protocol = self.resolved_protocol()
        self.resolved_recipe()
        check_method(self.method)
        if self.split not in SPLITS:
            raise UserError(f"Unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}.")
        if self.clients < 1:
            raise UserError("--clients must be at least 1.")
        if self.rounds < 1:
            raise UserError("--rounds must be at least 1.")
        if self.local_epochs < 1:
            raise UserError("--local-epochs must be at least 1.")
        if not self.beta > 0:
            raise UserError("--beta must be positive.")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be at least 1.")
        if self.sample_count < 0:
            raise UserError("The number of sample images cannot be negative.")
        if self.eval_samples < 0 or self.eval_samples == 1:
            raise UserError("--eval-samples must be 0 (no evaluation) or at least 2.")
        self.grid_sampler().validate()
        self.eval_sampler().validate()
        self.resolved_personal_model()
        if self.eval_every < 0:
            raise UserError("--eval-every must be 0 (only the final models) or a number of "
                            "rounds.")
        privacy = self.privacy()
        allowed = check_budget(privacy, self.rounds)
        if privacy is not None and allowed < self.rounds:
            raise UserError(f"--rounds {self.rounds} would spend more than the epsilon budget "
                            f"{privacy.epsilon_budget:g}, which allows {allowed} round(s); "
                            "lower --rounds or raise --dp-epsilon-budget.")
        if self.eval_every and not self.eval_samples:
            raise UserError("--eval-every needs --eval-samples (the images scored each time).")
        if self.eval_samples:
            parse_metrics(self.eval_metrics)
            if self.eval_personal not in PERSONAL_MODES:
                raise UserError(f"Unknown --eval-personal {self.eval_personal!r}; choose one "
                                f"of: {', '.join(PERSONAL_MODES)}.")
        if protocol.celeba_range != "[-1, 1]" and self.dataset.strip().lower() == "celeba":
            raise UserError(
                f"The {protocol.name} protocol trains CelebA in {protocol.celeba_range}, which "
                "the training loop cannot do yet (it maps every image to [-1, 1]); use "
                "--protocol product for CelebA in [-1, 1] (its class numbering follows "
                "the protocol either way).")


class _Discard:
    """A byte sink that keeps nothing (for hashing a file without writing it)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def client_ids(k: int) -> list[str]:
    width = max(2, len(str(k - 1)))
    return [f"client-{i:0{width}d}" for i in range(k)]


def _state(model: torch.nn.Module) -> Weights:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


# --- the pieces before the rounds ------------------------------------------------------------

def _evaluator(config: SimulationConfig, preset: Preset, device: torch.device,
               log: Log) -> Evaluator | None:
    """The evaluator of the final models, resolved before training (None: no evaluation),
    so that missing feature weights show up at once."""
    if not config.eval_samples:
        return None
    evaluator = Evaluator(config.eval_metrics, config.dataset,
                          image_size=preset.config.image_size, channels=preset.config.channels,
                          data_dir=config.data_dir, inception_weights=config.inception_weights,
                          device=device, log=log)
    evaluator.require_some()
    for metric, reason in evaluator.unavailable.items():
        log(f"  note: {metric} is unavailable: {reason}")
    return evaluator


def _client_images(config: SimulationConfig, image_size: int, channels: int
                   ) -> tuple[str, dict[str, torch.Tensor]]:
    """Each client's training images: its folder's (client_folders), else its partition of
    `dataset`. Returns the data's name and the images by client id, in client id order."""
    if config.client_folders:
        root = Path(config.client_folders).expanduser()
        if not root.is_dir():
            raise UserError(f"The client folders {root} do not exist; give a folder with one "
                            "folder of images per client.")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"{root} holds no client folders; give a folder with one folder "
                            "of images per client (feddiffuse partition --export writes one).")
        return str(root), {p.name: load_image_folder(p, image_size, channels).images
                           for p in folders}
    data = load_dataset(config.dataset, image_size=image_size, channels=channels,
                        split="train", data_dir=config.data_dir, limit=config.limit,
                        seed=config.seed)
    labels = data.labels
    if data.name == "celeba" and labels is not None and \
            config.resolved_protocol().celeba_classes == "male-first":
        labels = authors_classes(labels)  # the label skew draws per class, in class order
    parts = partition_indices(len(data), config.clients, config.split, labels=labels,
                              beta=config.beta, seed=config.resolved_partition_seed())
    return data.name, {cid: data.images.index_select(0, idx).contiguous()
                       for cid, idx in zip(client_ids(config.clients), parts, strict=True)}


@dataclass
class _Run:
    """Everything one simulation holds while it runs: the hub's side and every client's."""

    config: SimulationConfig
    recipe: Recipe
    preset: Preset
    device: torch.device
    device_reason: str
    data_name: str
    images: dict[str, torch.Tensor]  # each client's training images, by client id
    model: torch.nn.Module  # one UNet, loaded with whoever's weights are being used
    seg_of: dict[str, str]
    counts: dict[str, int]
    global_state: Weights
    schedule: DiffusionSchedule = field(default_factory=DiffusionSchedule.linear)
    # Each client's own copy of the segments that never travel back (ulatdec, udec).
    personal_state: dict[str, Weights] = field(default_factory=dict)
    # Each client's whole model as it trained it in its last round (personal methods).
    last_local: dict[str, Weights] = field(default_factory=dict)
    # The recipe's EMA: the hub's of the global model, each client's of its personal segments.
    ema_global: Weights | None = None
    ema_personal: dict[str, Weights] = field(default_factory=dict)
    # The recipe's keep_optimizer: each client's optimiser moments, carried to its next round.
    optimizer_states: dict[str, Weights] = field(default_factory=dict)
    ledger: CommLedger = field(default_factory=CommLedger)
    # The codecs; each client's error feedback (what its lossy uploads have not sent yet);
    # the last round's update as the hub sends it (a lossy downlink), and the model it
    # applies to.
    links: LinkCodecs = field(default_factory=LinkCodecs)
    residuals: dict[str, Weights] = field(default_factory=dict)
    downlink_wire: Weights | None = None
    previous_global: Weights | None = None
    initial_wire: Weights | None = None
    previous_version: str = ""
    rounds_report: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    privacy: PrivacySettings | None = None

    @property
    def ids(self) -> list[str]:
        return list(self.images)

    @property
    def sizes(self) -> dict[str, int]:
        return {cid: int(x.shape[0]) for cid, x in self.images.items()}

    @property
    def batch_size(self) -> int:
        return self.recipe.batch_size or self.preset.batch_size

    @property
    def personal(self) -> tuple[str, ...]:
        return personal_segments(self.config.method)

    @property
    def sample_global(self) -> Weights:
        """The global model to sample from: the EMA when the recipe keeps one."""
        return self.global_state if self.ema_global is None else self.ema_global


def _start(config: SimulationConfig, recipe: Recipe, device: torch.device, device_reason: str,
           log: Log) -> _Run:
    """The clients' data and the initial model, and the opening lines of the log."""
    preset = get_preset(config.preset)
    data_name, images = _client_images(config, preset.config.image_size,
                                       preset.config.channels)
    model = build_unet(preset, seed=config.seed)
    links = config.links()
    first, initial_wire = initial_global(_state(model), links)
    run = _Run(config=config, recipe=recipe, preset=preset, device=device,
               device_reason=device_reason, data_name=data_name, images=images, model=model,
               seg_of=segment_map(model), counts=count_parameters(model),
               global_state=first, links=links, initial_wire=initial_wire,
               privacy=config.privacy())
    log(f"FedDiffuse simulation: {config.method} on {data_name}, {len(run.ids)} client(s), "
        f"{config.rounds} round(s) x {config.local_epochs} local epoch(s), split {config.split}")
    log(f"  preset {preset.name} ({run.counts['total_params']:,} parameters), "
        f"{sum(run.sizes.values()):,} training images, device {device} ({device_reason})")
    log(f"  recipe {recipe.name}: {recipe.optimizer} lr {recipe.lr:g}, {recipe.loss}"
        f"{' min-snr' if recipe.loss_weighting == 'min-snr' else ''}, batch {run.batch_size}"
        f"{', bf16' if recipe.bf16 else ''}"
        f"{f', EMA {recipe.ema_decay:g} per round' if recipe.ema_decay is not None else ''}")
    log(f"  protocol {config.protocol}: {config.eval_sampler().describe()}"
        + (f", personal models {config.resolved_personal_model()}"
           if has_personal_models(config.method) else ""))
    if run.privacy is not None:
        log(f"  privacy: {run.privacy.describe()}")
    log("  client sizes: " + ", ".join(f"{c}={n}" for c, n in run.sizes.items()))
    return run


# --- one round: the architecture's five steps ------------------------------------------------

@dataclass
class _Round:
    """One round in flight: the hub's round state, the version it serves, its payloads."""

    index: int
    state: RoundState
    version: str
    started: float
    base_version: str = ""  # the previous round's version (a lossy downlink's delta base)
    payloads: dict[tuple[str, ...], bytes] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    update_norms: dict[str, float] = field(default_factory=dict)  # DP: before the clip


def _open_round(run: _Run, r: int) -> _Round:
    """Step 1: the hub opens round r: participants, their assignments, the global version."""
    started = time.perf_counter()
    state = RoundState.open(run.config.method, r, run.ids, run.global_state, run.seg_of,
                            seed=run.config.seed,
                            strategy=run.recipe.aggregation(run.privacy))
    # Hashed while streamed, without building the file in memory just to hash it.
    version, _ = write_tensors(_Discard(), run.global_state, global_metadata(run.preset.name, r))
    rnd = _Round(r, state, version, started, base_version=run.previous_version)
    run.previous_version = version
    return rnd


def _download(run: _Run, rnd: _Round, cid: str) -> Weights:
    """Step 2a: the client downloads what its manifest names and merges it with its own
    segments. Returns the weights it starts training from."""
    plan = rnd.state.plans[cid]
    key = ",".join(plan.download)
    names = rnd.state.names_for(plan.download)
    shapes = {n: tuple(run.global_state[n].shape) for n in names}
    links, name = run.links, run.preset.name
    if plan.download not in rnd.payloads:
        if rnd.index == 1 and run.initial_wire is not None:
            rnd.payloads[plan.download] = _payload(wire_subset(run.initial_wire, names),
                                                   global_metadata(name, 1), links.initial)
        elif rnd.index > 1 and links.sends_deltas:
            assert run.downlink_wire is not None
            rnd.payloads[plan.download] = _payload(
                wire_subset(run.downlink_wire, names),
                delta_metadata(name, rnd.index, rnd.version, rnd.base_version, key),
                links.downlink)
        else:
            rnd.payloads[plan.download] = encode_tensors(
                rnd.state.download_tensors(cid),
                global_metadata(name, rnd.index) if key == ALL_KEY else
                segment_metadata(name, rnd.index, rnd.version, key))
    body = rnd.payloads[plan.download]
    rnd.state.record_download(cid, len(body))
    if rnd.index > 1 and links.sends_deltas:  # the client adds the update to its copy
        assert run.previous_global is not None
        update, _ = decode_payload(body, links.downlink, shapes)
        received = apply_update(run.previous_global, update)
    else:
        received, _ = decode_payload(body, links.initial if rnd.index == 1 else FP32, shapes)
    return {**run.personal_state.get(cid, {}), **received}


def _train(run: _Run, rnd: _Round, cid: str, start: Weights, log: Log
           ) -> tuple[TrainResult, Weights]:
    """Step 2b: the client trains E local epochs on its own images; it keeps its personal
    segments (and their EMA), its optimiser state and, for personal methods, its model."""
    config, r = run.config, rnd.index
    run.model.load_state_dict(start, strict=True)

    def on_epoch(rep, _model):
        log(f"  round {r}/{config.rounds} {cid}: epoch {rep.epoch}/"
            f"{config.local_epochs} loss {rep.mean_loss:.4f} "
            f"({rep.images / max(rep.seconds, 1e-9):.0f} img/s)")

    train_cfg = run.recipe.train_config(
        epochs=config.local_epochs, images=run.sizes[cid], round_index=r,
        rounds=config.rounds, batch_size=run.batch_size,
        max_steps_per_epoch=config.max_steps_per_epoch)
    result = train_local(run.model, run.images[cid], run.schedule, train_cfg,
                         seed=training_seed(config.seed, r, cid), device=run.device,
                         on_epoch=on_epoch, optimizer_state=run.optimizer_states.get(cid))
    if run.recipe.keep_optimizer and result.epochs:
        run.optimizer_states[cid] = result.epochs[-1].optimizer_state()
    trained = _state(run.model)
    if run.personal:
        run.last_local[cid] = trained
        run.personal_state[cid] = {n: t for n, t in trained.items()
                                   if run.seg_of[n] in run.personal}
        if run.recipe.ema_decay is not None:
            run.ema_personal[cid] = update_ema(run.ema_personal.get(cid),
                                               run.personal_state[cid], run.recipe.ema_decay)
    return result, trained


def _upload(run: _Run, rnd: _Round, cid: str, trained: Weights, mean_loss: float | None = None
            ) -> bytes:
    """Step 3: the client encodes `local - global` for its upload segments only."""
    upload_shapes = rnd.state.expected_upload_shapes(cid)
    delta = {n: trained[n] - run.global_state[n] for n in upload_shapes}
    num_samples = run.sizes[cid]
    if run.privacy is not None:  # clip (local DP: and noise) before encoding, as a client does
        private = privatize_upload(delta, run.privacy)
        delta = private.tensors
        rnd.update_norms[cid] = private.norm_before
        if run.privacy.mode == "local":
            num_samples, mean_loss = 1, None
    residual = run.residuals.get(cid, {})
    wire, left = compress_with_feedback(delta, residual, run.links.uplink)
    if left:
        run.residuals[cid] = {**residual, **left}
    meta = upload_metadata(run.preset.name, rnd.index, rnd.version, num_samples,
                           ",".join(rnd.state.plans[cid].upload), mean_loss)
    return _payload(wire, meta, run.links.uplink)


def _payload(wire: Weights, metadata: dict, codec: Codec) -> bytes:
    buffer = io.BytesIO()
    write_payload(buffer, wire, metadata, codec)
    return buffer.getvalue()


def _accept(run: _Run, rnd: _Round, cid: str, body: bytes) -> None:
    """Step 4: the hub validates the upload and adds it to the round's running sum."""
    decoded, meta = decode_payload(body, run.links.uplink, rnd.state.expected_upload_shapes(cid))
    rnd.state.accept(cid, decoded, int(meta["feddiffuse.num_samples"]), len(body))


def _finalize(run: _Run, rnd: _Round, log: Log) -> None:
    """Step 5: the hub finalises: the weighted mean update, the next global model (and its
    EMA), the round's ledger entries; then the round's line of the report."""
    r = rnd.index
    outcome = rnd.state.finalize()
    if run.links.sends_deltas:  # the hub applies the update it sends, decoded
        run.previous_global = run.global_state
        run.global_state, run.downlink_wire = apply_downlink(
            run.global_state, outcome.global_state, run.links.downlink)
    else:
        run.global_state = outcome.global_state
    if run.recipe.ema_decay is not None:
        run.ema_global = update_ema(run.ema_global, run.global_state, run.recipe.ema_decay)
    run.ledger.extend(outcome.transfers)
    tot = run.ledger.totals(r)
    cum = run.ledger.totals()
    sizes = run.sizes
    mean_loss = sum(c["mean_loss"] * c["samples"] for c in rnd.clients) / sum(sizes.values())
    seconds = time.perf_counter() - rnd.started
    line = {"round": r, "clients": rnd.clients, "mean_loss": mean_loss,
            "ledger": tot, "cumulative_params": cum["total_params"],
            "cumulative_bytes": cum["total_bytes"], "seconds": seconds}
    dp = ""
    if run.privacy is not None:
        line["privacy"] = {"epsilon": spent(run.privacy, r), "delta": run.privacy.delta,
                           "noise": run.privacy.noise,
                           "noise_added_by": "hub" if run.privacy.mode == "central"
                           else "clients"}
        dp = f", epsilon {line['privacy']['epsilon']:.4g} ({run.privacy.mode} DP)"
    run.rounds_report.append(line)
    log(f"round {r}/{run.config.rounds} done: mean loss {mean_loss:.4f}, "
        f"{tot['total_params']:,} params / {tot['total_bytes'] / 1e6:.2f} MB exchanged "
        f"(cumulative {cum['total_params']:,} / {cum['total_bytes'] / 1e6:.2f} MB), "
        f"{seconds:.1f} s{dp}")


def _run_round(run: _Run, r: int, log: Log) -> None:
    """One round, as the architecture's five steps."""
    rnd = _open_round(run, r)                                 # 1. the hub opens round r
    for cid in run.ids:
        start = _download(run, rnd, cid)                      # 2. the client downloads,
        result, trained = _train(run, rnd, cid, start, log)   #    merges and trains,
        body = _upload(run, rnd, cid, trained, result.mean_loss)
        _accept(run, rnd, cid, body)                          # 3. uploads; 4. the hub accepts
        plan = rnd.state.plans[cid]
        rnd.clients.append({"client": cid, "samples": run.sizes[cid],
                            "mean_loss": result.mean_loss, "uploaded": list(plan.upload),
                            "downloaded": list(plan.download),
                            **({"update_norm": rnd.update_norms[cid]}
                               if cid in rnd.update_norms else {})})
    _finalize(run, rnd, log)                                  # 5. the hub aggregates


# --- after the rounds ------------------------------------------------------------------------

def models_to_score(run: _Run, personal_model: str) -> dict[str, Weights]:
    """The model(s) to sample and evaluate now: the global one (its EMA if kept), or every
    client's personal model, "merged" (the global model with the client's own segments, its
    EMA if kept: what the client holds) or "last-local" (as the client trained it in its
    last round, the paper's choice)."""
    if not has_personal_models(run.config.method):
        return {"global": run.sample_global}
    if personal_model == "last-local":
        return {cid: run.last_local[cid] for cid in run.ids}
    return {cid: {**run.sample_global, **run.ema_personal.get(cid, run.personal_state[cid])}
            for cid in run.ids}


def _save(run: _Run, out: Path) -> dict[str, str]:
    """global.safetensors (the model to sample from: the EMA when the recipe keeps one; then
    global-raw.safetensors is the last aggregate, the one training continued from), and per
    personal-model client personal-<id> (merged) and local-<id> (last-local)."""
    config = run.config
    meta = {"preset": run.preset.name, "method": config.method, "rounds": config.rounds,
            "seed": config.seed, "recipe": run.recipe.name}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "global.safetensors", run.sample_global,
                 {**meta, "kind": "global" if run.ema_global is None else "global-ema"})
    files = {"global": str(out / "global.safetensors")}
    if run.ema_global is not None:
        save_weights(out / "global-raw.safetensors", run.global_state, {**meta, "kind": "global"})
        files["global-raw"] = str(out / "global-raw.safetensors")
    if has_personal_models(config.method):
        merged = models_to_score(run, "merged")
        for cid in run.ids:
            path = out / f"personal-{cid}.safetensors"
            save_weights(path, merged[cid], {**meta, "kind": "personal", "client": cid})
            files[cid] = str(path)
            local = out / f"local-{cid}.safetensors"
            save_weights(local, run.last_local[cid],
                         {**meta, "kind": "last-local", "client": cid})
            files[f"local-{cid}"] = str(local)
    return files


def _sample_grid(run: _Run, models: dict[str, Weights], out: Path, log: Log) -> Path | None:
    """samples.png: `sample_count` images, one row per personal model."""
    config = run.config
    if config.sample_count <= 0:
        return None
    spec = config.grid_sampler()
    grids = []
    per_model = (config.sample_count if len(models) == 1
                 else max(1, config.sample_count // len(models)))
    for j, weights in enumerate(models.values()):
        run.model.load_state_dict(weights)
        run.model.to(run.device)
        gen = make_generator(config.seed * 7 + 1000 + j, run.device)
        grids.append(sample(run.model, run.schedule.to(run.device), per_model, gen, spec.name,
                            steps=spec.steps, device=run.device, clip_x0=spec.clips))
    nrow = per_model if len(grids) > 1 else None
    path = save_grid(torch.cat(grids), out / "samples.png", nrow=nrow)
    log(f"samples: {path} ({len(grids)} model(s), {spec.describe()})")
    return path


def _evaluate(run: _Run, evaluator: Evaluator, log: Log) -> dict:
    config = run.config
    personal_model = config.resolved_personal_model()
    return evaluate_models(evaluator, run.model, models_to_score(run, personal_model),
                           config.eval_samples, personal=config.eval_personal,
                           sampler=config.eval_sampler(), seed=config.seed * 7 + 5000,
                           device=run.device, log=log, personal_model=personal_model)


def _curve_point(run: _Run, r: int, evaluation: dict) -> dict:
    """One point of the metric curve: the headline metrics after round r, and the traffic."""
    cum = run.ledger.totals()
    return {"round": r, "cumulative_params": cum["total_params"],
            "cumulative_bytes": cum["total_bytes"], "samples": evaluation["samples"],
            "headline": evaluation["headline"],
            "pooled": {m: v.get("value") for m, v in evaluation["metrics"].items()}
            if evaluation["models"] == "personal" else None}


def _report(run: _Run, files: dict[str, str], samples_path: Path | None,
            evaluation: dict | None, started: float) -> dict:
    config = run.config
    return {
        "config": asdict(config),
        "protocol": config.resolved_settings(),
        "recipe": run.recipe.to_dict(),
        "preset": {"name": run.preset.name, **run.counts},
        "dataset": {"name": run.data_name, "images": sum(run.sizes.values()),
                    "client_sizes": run.sizes},
        "device": {"name": str(run.device), "reason": run.device_reason},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "rounds": run.rounds_report,
        "ledger": {"totals": run.ledger.totals(), "per_client": run.ledger.per_client()},
        "files": {"weights": files, "samples": str(samples_path) if samples_path else None},
        "evaluation": evaluation,
        "curve": run.curve or None,
        "privacy": None if run.privacy is None else privacy_report(
            run.privacy, [line["round"] for line in run.rounds_report]).model_dump(),
        "seconds": time.perf_counter() - started,
    }


def run_simulation(config: SimulationConfig, log: Log = print,
                   recipe: Recipe | None = None,
                   on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None
                   ) -> dict:
    """Run a simulation and write its report, weights and sample grid under `config.out`.

    `recipe` replaces the configured one (benchmarks compare variants with it); `on_round`
    is called with each round's new global weights.
    """
    config.validate()
    recipe = (recipe or config.resolved_recipe()).validate()
    started = time.perf_counter()
    out = Path(config.out)
    device, device_reason = select_device(config.device)
    evaluator = _evaluator(config, get_preset(config.preset), device, log)
    run = _start(config, recipe, device, device_reason, log)
    for r in range(1, config.rounds + 1):
        _run_round(run, r, log)
        if on_round is not None:
            on_round(r, run.global_state)
        if evaluator is not None and config.eval_every and r % config.eval_every == 0 \
                and r < config.rounds:
            log(f"after round {r}:")
            run.curve.append(_curve_point(run, r, _evaluate(run, evaluator, log)))
    files = _save(run, out)
    samples_path = _sample_grid(run, models_to_score(run, config.resolved_personal_model()),
                                out, log)
    evaluation = None
    if evaluator is not None:
        evaluation = _evaluate(run, evaluator, log)
        if config.eval_every:
            run.curve.append(_curve_point(run, config.rounds, evaluation))
    report = _report(run, files, samples_path, evaluation, started)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    totals = run.ledger.totals()
    log(f"done in {report['seconds']:.1f} s: {totals['total_params']:,} parameters "
        f"({totals['total_bytes'] / 1e6:.2f} MB) exchanged; report {out / 'report.json'}")
    return report
