"""The federated simulator: the whole loop in one process, with the product's own parts.

Every transfer goes through the wire codec (safetensors bytes, validated on decode), every
round through `RoundState`, every client's training through `train_local`: the same functions
the hub and the edge client use, so research numbers come from the product's code.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data import load_dataset, load_image_folder, partition_indices
from .data.partition import SPLITS
from .diffusion import DiffusionSchedule, make_generator, sample
from .errors import UserError
from .evaluation import DEFAULT_METRICS, PERSONAL_MODES, Evaluator, evaluate_models, parse_metrics
from .images import save_grid
from .ledger import CommLedger
from .methods import check_method, has_personal_models, personal_segments
from .model import build_unet, count_parameters, get_preset, segment_map
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe, update_ema
from .rounds import RoundState, training_seed
from .training import select_device, train_local
from .wire import atomic_write_bytes, decode_tensors, encode_tensors, save_weights, write_tensors

Log = Callable[[str], None]


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
    partition_seed: int | None = None  # None: use `seed`
    limit: int | None = None
    data_dir: str | None = None
    # A folder with one folder of images per client (as `feddiffuse partition --export`
    # writes, or as the data owners hold them): each client trains on its own folder, loaded
    # as the edge client loads it, and the client ids are the folder names. `dataset` then
    # only names the reference set for evaluation; `clients`, `split` and `limit` are unused.
    client_folders: str | None = None
    out: str = "runs/simulate"
    recipe: str = DEFAULT_RECIPE  # see feddiffuse.shared.recipes
    batch_size: int | None = None  # None: the recipe's, else the preset's default
    lr: float | None = None  # None: the recipe's
    loss: str | None = None  # None: the recipe's
    device: str = "auto"
    channels_last: bool = True
    bf16: bool | None = None  # None: the recipe's
    sample_count: int = 64  # images in samples.png (per personal model: one row)
    sample_steps: int = 50
    max_steps_per_epoch: int | None = None
    # Evaluation of the final model(s); 0 samples: none. See feddiffuse.shared.evaluation.
    eval_samples: int = 0  # per model ("each") or in total over personal models ("split")
    eval_steps: int = 50  # DDIM steps of the evaluation samples
    eval_metrics: str = DEFAULT_METRICS
    eval_personal: str = "each"
    inception_weights: str | None = None

    def resolved_recipe(self) -> Recipe:
        """The recipe with this run's explicit overrides."""
        recipe = get_recipe(self.recipe).with_overrides(
            lr=self.lr, loss=self.loss, bf16=self.bf16, batch_size=self.batch_size)
        return replace(recipe, channels_last=self.channels_last)

    def validate(self) -> None:
        get_preset(self.preset)
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
        if self.eval_samples:
            parse_metrics(self.eval_metrics)
            if self.eval_personal not in PERSONAL_MODES:
                raise UserError(f"Unknown --eval-personal {self.eval_personal!r}; choose one "
                                f"of: {', '.join(PERSONAL_MODES)}.")


class _Discard:
    """A byte sink that keeps nothing (for hashing a file without writing it)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def client_ids(k: int) -> list[str]:
    width = max(2, len(str(k - 1)))
    return [f"client-{i:0{width}d}" for i in range(k)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


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
    part_seed = config.seed if config.partition_seed is None else config.partition_seed
    parts = partition_indices(len(data), config.clients, config.split, labels=data.labels,
                              beta=config.beta, seed=part_seed)
    return data.name, {cid: data.images.index_select(0, idx).contiguous()
                       for cid, idx in zip(client_ids(config.clients), parts, strict=True)}


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
    preset = get_preset(config.preset)
    cfg = preset.config
    device, device_reason = select_device(config.device)
    out = Path(config.out)
    evaluator = None
    if config.eval_samples:
        # Resolved before training, so that missing feature weights show up at once.
        evaluator = Evaluator(config.eval_metrics, config.dataset, image_size=cfg.image_size,
                              channels=cfg.channels, data_dir=config.data_dir,
                              inception_weights=config.inception_weights, device=device,
                              log=log)
        evaluator.require_some()
        for metric, reason in evaluator.unavailable.items():
            log(f"  note: {metric} is unavailable: {reason}")

    data_name, client_images = _client_images(config, cfg.image_size, cfg.channels)
    ids = list(client_images)
    sizes = {cid: int(x.shape[0]) for cid, x in client_images.items()}
    total_images = sum(sizes.values())

    model = build_unet(preset, seed=config.seed)
    seg_of = segment_map(model)
    counts = count_parameters(model)
    global_state = _state(model)
    schedule = DiffusionSchedule.linear()
    batch_size = recipe.batch_size or preset.batch_size
    personal = personal_segments(config.method)
    # Each client's own copy of the segments that never travel back (ulatdec, udec).
    personal_state: dict[str, dict[str, torch.Tensor]] = {}
    # The recipe's EMA: the hub's of the global model, each client's of its personal segments.
    ema_global: dict[str, torch.Tensor] | None = None
    ema_personal: dict[str, dict[str, torch.Tensor]] = {}
    # The recipe's keep_optimizer: each client's optimiser moments, carried to its next round.
    optimizer_states: dict[str, dict[str, torch.Tensor]] = {}

    log(f"FedDiffuse simulation: {config.method} on {data_name}, {len(ids)} client(s), "
        f"{config.rounds} round(s) x {config.local_epochs} local epoch(s), split {config.split}")
    log(f"  preset {preset.name} ({counts['total_params']:,} parameters), "
        f"{total_images:,} training images, device {device} ({device_reason})")
    log(f"  recipe {recipe.name}: {recipe.optimizer} lr {recipe.lr:g}, {recipe.loss}"
        f"{' min-snr' if recipe.loss_weighting == 'min-snr' else ''}, batch {batch_size}"
        f"{', bf16' if recipe.bf16 else ''}"
        f"{f', EMA {recipe.ema_decay:g} per round' if recipe.ema_decay is not None else ''}")
    log("  client sizes: " + ", ".join(f"{c}={n}" for c, n in sizes.items()))

    ledger = CommLedger()
    rounds_report = []
    for r in range(1, config.rounds + 1):
        round_started = time.perf_counter()
        state = RoundState.open(config.method, r, ids, global_state, seg_of, seed=config.seed,
                                strategy=recipe.aggregation())
        # Hashed while streamed, without building the file in memory just to hash it.
        version, _ = write_tensors(_Discard(), global_state,
                                   {"kind": "global", "preset": preset.name, "round": r})
        payloads: dict[tuple[str, ...], bytes] = {}
        client_rows = []
        for cid in ids:
            plan = state.plans[cid]
            if plan.download not in payloads:
                payloads[plan.download] = encode_tensors(
                    state.download_tensors(cid),
                    {"kind": "global", "preset": preset.name, "round": r, "version": version,
                     "segments": ",".join(plan.download)})
            body = payloads[plan.download]
            state.record_download(cid, len(body))
            received, _ = decode_tensors(body)
            local = {**personal_state.get(cid, {}), **received}
            model.load_state_dict(local, strict=True)

            def on_epoch(rep, _model, cid=cid, r=r):
                log(f"  round {r}/{config.rounds} {cid}: epoch {rep.epoch}/"
                    f"{config.local_epochs} loss {rep.mean_loss:.4f} "
                    f"({rep.images / max(rep.seconds, 1e-9):.0f} img/s)")

            train_cfg = recipe.train_config(
                epochs=config.local_epochs, images=sizes[cid], round_index=r,
                rounds=config.rounds, batch_size=batch_size,
                max_steps_per_epoch=config.max_steps_per_epoch)
            result = train_local(model, client_images[cid], schedule, train_cfg,
                                 seed=training_seed(config.seed, r, cid), device=device,
                                 on_epoch=on_epoch,
                                 optimizer_state=optimizer_states.get(cid))
            if recipe.keep_optimizer and result.epochs:
                optimizer_states[cid] = result.epochs[-1].optimizer_state()
            trained = _state(model)
            if personal:
                personal_state[cid] = {n: t for n, t in trained.items() if seg_of[n] in personal}
                if recipe.ema_decay is not None:
                    ema_personal[cid] = update_ema(ema_personal.get(cid), personal_state[cid],
                                                   recipe.ema_decay)
            upload_shapes = state.expected_upload_shapes(cid)
            delta = {n: trained[n] - global_state[n] for n in upload_shapes}
            body = encode_tensors(delta, {"kind": "delta", "preset": preset.name, "round": r,
                                          "base_version": version,
                                          "num_samples": sizes[cid],
                                          "segments": ",".join(plan.upload)})
            decoded, meta = decode_tensors(body, upload_shapes)
            state.accept(cid, decoded, int(meta["feddiffuse.num_samples"]), len(body))
            client_rows.append({"client": cid, "samples": sizes[cid],
                                "mean_loss": result.mean_loss,
                                "uploaded": list(plan.upload),
                                "downloaded": list(plan.download)})
        outcome = state.finalize()
        global_state = outcome.global_state
        if on_round is not None:
            on_round(r, global_state)
        if recipe.ema_decay is not None:
            ema_global = update_ema(ema_global, global_state, recipe.ema_decay)
        ledger.extend(outcome.transfers)
        tot = ledger.totals(r)
        cum = ledger.totals()
        mean_loss = sum(c["mean_loss"] * c["samples"] for c in client_rows) / sum(sizes.values())
        rounds_report.append({"round": r, "clients": client_rows, "mean_loss": mean_loss,
                              "ledger": tot, "cumulative_params": cum["total_params"],
                              "cumulative_bytes": cum["total_bytes"],
                              "seconds": time.perf_counter() - round_started})
        log(f"round {r}/{config.rounds} done: mean loss {mean_loss:.4f}, "
            f"{tot['total_params']:,} params / {tot['total_bytes'] / 1e6:.2f} MB exchanged "
            f"(cumulative {cum['total_params']:,} / {cum['total_bytes'] / 1e6:.2f} MB), "
            f"{time.perf_counter() - round_started:.1f} s")

    out.mkdir(parents=True, exist_ok=True)
    meta = {"preset": preset.name, "method": config.method, "rounds": config.rounds,
            "seed": config.seed, "recipe": recipe.name}
    # global.safetensors is the model to sample from: the EMA when the recipe keeps one
    # (then global-raw.safetensors is the last aggregate, the one training continued from).
    sample_global = global_state if ema_global is None else ema_global
    save_weights(out / "global.safetensors", sample_global,
                 {**meta, "kind": "global" if ema_global is None else "global-ema"})
    weight_files = {"global": str(out / "global.safetensors")}
    if ema_global is not None:
        save_weights(out / "global-raw.safetensors", global_state, {**meta, "kind": "global"})
        weight_files["global-raw"] = str(out / "global-raw.safetensors")
    models_to_sample: dict[str, dict[str, torch.Tensor]] = {}
    if has_personal_models(config.method):
        for cid in ids:
            personal_model = {**sample_global, **ema_personal.get(cid, personal_state[cid])}
            path = out / f"personal-{cid}.safetensors"
            save_weights(path, personal_model, {**meta, "kind": "personal", "client": cid})
            weight_files[cid] = str(path)
            models_to_sample[cid] = personal_model
    else:
        models_to_sample["global"] = sample_global

    samples_path = None
    if config.sample_count > 0:
        grids = []
        per_model = (config.sample_count if len(models_to_sample) == 1
                     else max(1, config.sample_count // len(models_to_sample)))
        for j, (_name, weights) in enumerate(models_to_sample.items()):
            model.load_state_dict(weights)
            model.to(device)
            gen = make_generator(config.seed * 7 + 1000 + j, device)
            grids.append(sample(model, schedule.to(device), per_model, gen, "ddim",
                                steps=config.sample_steps, device=device))
        nrow = per_model if len(grids) > 1 else None
        samples_path = save_grid(torch.cat(grids), out / "samples.png", nrow=nrow)
        log(f"samples: {samples_path} ({len(grids)} model(s), DDIM {config.sample_steps} steps)")

    evaluation = None
    if evaluator is not None:
        evaluation = evaluate_models(evaluator, model, models_to_sample, config.eval_samples,
                                     personal=config.eval_personal, steps=config.eval_steps,
                                     seed=config.seed * 7 + 5000, device=device, log=log)

    report = {
        "config": asdict(config),
        "recipe": recipe.to_dict(),
        "preset": {"name": preset.name, **counts},
        "dataset": {"name": data_name, "images": total_images, "client_sizes": sizes},
        "device": {"name": str(device), "reason": device_reason},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "rounds": rounds_report,
        "ledger": {"totals": ledger.totals(), "per_client": ledger.per_client()},
        "files": {"weights": weight_files,
                  "samples": str(samples_path) if samples_path else None},
        "evaluation": evaluation,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    totals = ledger.totals()
    log(f"done in {report['seconds']:.1f} s: {totals['total_params']:,} parameters "
        f"({totals['total_bytes'] / 1e6:.2f} MB) exchanged; report {out / 'report.json'}")
    return report
