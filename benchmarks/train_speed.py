"""Training speed of the FedDiffuse UNets on this machine's CPU.

Three measurements, each taken in one process so that the ratios compare like with like:

1. images/s of the ``tiny`` and ``paper-fmnist`` presets, plain fp32 eager, one training step
   being the library's own step (uint8 batch -> [-1, 1], ``diffusion_loss`` with the Huber
   loss, backward, Adam) on real Fashion-MNIST batches;
2. the speed-up of channels_last, bf16 autocast and both against that fp32 baseline, and a
   numerical check that the options keep training "within noise" (``train_local`` from the
   same seed under each option, compared with fp32 and with fp32 from another seed);
3. the simulator's overhead: ``run_simulation`` against a bare loop doing exactly the same
   training steps (same model, batch sizes, number of steps, Adam, ``diffusion_loss``).

Variants are interleaved (A, B, C, D, then rotated) and summarised by medians, because the
machine may be shared. Run ``.venv/bin/python benchmarks/train_speed.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from feddiffuse.shared import simulate as simulate_module
from feddiffuse.shared.data import fashion_mnist as fmnist_module
from feddiffuse.shared.data import load_fashion_mnist, partition_indices, to_model_range
from feddiffuse.shared.diffusion import DiffusionSchedule, diffusion_loss, make_generator
from feddiffuse.shared.model import build_unet, get_preset
from feddiffuse.shared.simulate import SimulationConfig, run_simulation
from feddiffuse.shared.training import TrainConfig, train_local

PRESETS = ("tiny", "paper-fmnist")
DEFAULT_STEPS = {"tiny": 8, "paper-fmnist": 4}
QUICK_STEPS = {"tiny": 2, "paper-fmnist": 1}
LR = 1e-4
LOSS = "huber"
OVERHEAD_TARGET = 0.05


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    bf16: bool


VARIANTS = (
    Variant("fp32", False, False),
    Variant("channels_last", True, False),
    Variant("bf16", False, True),
    Variant("cl+bf16", True, True),
)
BASELINE = VARIANTS[0]


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe(fn: Callable[[], object]) -> object | None:
    try:
        return fn()
    except Exception:  # a private probe missing from this torch build
        return None


def environment() -> dict:
    flags = _cpu_flags()
    cpu = torch.cpu
    env = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": _probe(lambda: torch.backends.cpu.get_cpu_capability()),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "torch_avx512_bf16": _probe(lambda: cpu._is_avx512_bf16_supported()),
        "torch_amx_tile": _probe(lambda: cpu._is_amx_tile_supported()),
        "mkldnn_bf16": _probe(lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_flags": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16",
                                                       "amx_bf16", "amx_tile", "avx512_fp16")),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    native = env["torch_avx512_bf16"] or env["torch_amx_tile"] or bool(
        {"avx512_bf16", "amx_bf16"} & flags)
    env["bf16_native"] = bool(native)
    return env


def print_environment(env: dict) -> None:
    print(f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch {env['torch']}, "
          f"python {env['python']}, {env['threads']} torch thread(s), "
          f"capability {env['cpu_capability']}")
    amx = "AMX" if env["torch_amx_tile"] or "amx_bf16" in env["cpu_flags"] else "no AMX"
    print(f"bf16: {'native' if env['bf16_native'] else 'NOT native (emulated)'} "
          f"(torch avx512_bf16={env['torch_avx512_bf16']}, {amx}, "
          f"mkldnn bf16={env['mkldnn_bf16']}; cpu flags: {', '.join(env['cpu_flags']) or '-'})")
    load = env["loadavg_start"]
    if load is not None:
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if load[0] > 0.5:
            print("  WARNING: something else is using the CPU; absolute speeds will be low and "
                  "noisy. Ratios are measured interleaved, so they hold up better. With more "
                  "runnable threads than cores, PyTorch's OpenMP threads wait on each other and "
                  "a step can take several times longer than with --threads 1.")


# --------------------------------------------------------------------------------------
# The training step, written out as train_local does it
# --------------------------------------------------------------------------------------


def autocast(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               schedule: DiffusionSchedule, batch_uint8: torch.Tensor,
               generator: torch.Generator, variant: Variant) -> float:
    """One step, as in feddiffuse.shared.training.train_local: convert, loss, backward, Adam."""
    x = to_model_range(batch_uint8)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(variant.bf16):
        loss = diffusion_loss(model, schedule, x, generator, LOSS)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class Trainer:
    """A model and its Adam optimiser under one variant."""

    def __init__(self, preset: str, variant: Variant, schedule: DiffusionSchedule,
                 seed: int) -> None:
        self.variant = variant
        self.schedule = schedule
        self.model = build_unet(preset, seed=seed)
        self.model.train()
        if variant.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def step(self, batch: torch.Tensor, generator: torch.Generator) -> float:
        return train_step(self.model, self.optimizer, self.schedule, batch, generator,
                          self.variant)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------
# 1 + 2a: speed of each variant, interleaved
# --------------------------------------------------------------------------------------


def make_batches(images: torch.Tensor, batch: int, count: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(images.shape[0], generator=make_generator(seed))
    return [images.index_select(0, order[i * batch:(i + 1) * batch]).contiguous()
            for i in range(count)]


def measure_speed(preset: str, images: torch.Tensor, args: argparse.Namespace,
                  steps: int) -> dict:
    schedule = DiffusionSchedule.linear()
    batches = make_batches(images, args.batch, max(steps, args.warmup, 1), args.seed)
    trainers = {v.name: Trainer(preset, v, schedule, args.seed) for v in VARIANTS}
    for i in range(args.warmup):  # first steps build oneDNN primitives and Adam state
        for v in VARIANTS:
            trainers[v.name].step(batches[i % len(batches)], make_generator(args.seed))
    block: dict[str, list[float]] = {v.name: [] for v in VARIANTS}  # median s/step per block
    every: dict[str, list[float]] = {v.name: [] for v in VARIANTS}  # every step time
    for r in range(args.repeats):
        k = r % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:  # rotate the order every round
            gen = make_generator(args.seed + 1 + r)  # same t and noise for every variant
            times = []
            for s in range(steps):
                t0 = time.perf_counter()
                trainers[v.name].step(batches[s], gen)
                times.append(time.perf_counter() - t0)
            block[v.name].append(median(times))
            every[v.name].extend(times)
            print(f"    {preset} round {r + 1}/{args.repeats} {v.name:<13} "
                  f"{median(times):7.3f} s/step", flush=True)
    out = {"preset": preset, "batch": args.batch, "steps": steps, "repeats": args.repeats,
           "variants": {}}
    base = block[BASELINE.name]
    best_base = min(every[BASELINE.name])
    for v in VARIANTS:
        sec = median(block[v.name])
        best = min(every[v.name])
        ratios = [b / x for b, x in zip(base, block[v.name], strict=True)]
        out["variants"][v.name] = {
            "seconds_per_step": sec,
            "images_per_second": args.batch / sec,
            "speedup": median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "best_seconds_per_step": best,
            "best_images_per_second": args.batch / best,
            "best_speedup": best_base / best,
            "blocks_seconds_per_step": block[v.name],
            "step_seconds": every[v.name],
        }
    return out


def print_speed_table(results: list[dict]) -> None:
    print()
    print("Training speed (forward + backward + Adam, batch "
          f"{results[0]['batch']}). s/step and img/s: median over rounds of each block's "
          "median step; speed-up = fp32 time / variant time, median of the per-round ratios "
          "[min-max]; best: from the fastest single step of each variant.")
    header = (f"{'preset':<13} {'variant':<14} {'s/step':>7} {'img/s':>7} {'speed-up':>9} "
              f"{'range':>12}  {'best img/s':>10} {'best x':>7}")
    print(header)
    print("-" * len(header))
    for res in results:
        for v in VARIANTS:
            d = res["variants"][v.name]
            rng = f"[{d['speedup_min']:.2f}-{d['speedup_max']:.2f}]"
            print(f"{res['preset']:<13} {v.name:<14} {d['seconds_per_step']:7.3f} "
                  f"{d['images_per_second']:7.1f} {d['speedup']:8.2f}x {rng:>12}  "
                  f"{d['best_images_per_second']:10.1f} {d['best_speedup']:6.2f}x")
    if len(results) > 1:
        print()
        print(f"{'variant':<14} " + " ".join(f"{r['preset']:>14}" for r in results)
              + "   (speed-up against fp32, side by side)")
        for v in VARIANTS:
            print(f"{v.name:<14} " + " ".join(f"{r['variants'][v.name]['speedup']:13.2f}x"
                                             for r in results))


# --------------------------------------------------------------------------------------
# 2b: do channels_last / bf16 keep training within noise?
# --------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model: torch.nn.Module, schedule: DiffusionSchedule, images: torch.Tensor,
              batch: int, seed: int) -> float:
    """fp32 loss on fixed held-out images with fixed t and noise (identical for every model)."""
    model.eval()
    gen = make_generator(seed)
    total, n = 0.0, 0
    for i in range(0, images.shape[0], batch):
        x = to_model_range(images[i:i + batch])
        total += float(diffusion_loss(model, schedule, x, gen, LOSS)) * x.shape[0]
        n += x.shape[0]
    model.train()
    return total / n


def numerics_check(images: torch.Tensor, args: argparse.Namespace) -> dict:
    preset, steps, batch = args.check_preset, args.check_steps, args.batch
    last_k = max(1, steps // 4)
    order = torch.randperm(images.shape[0], generator=make_generator(args.seed + 99))
    train_images = images.index_select(0, order[:steps * batch]).contiguous()
    held_out = images.index_select(0, order[steps * batch:steps * batch + args.check_eval])
    schedule = DiffusionSchedule.linear()
    train_seed = args.seed + 7

    runs: list[tuple[str, Variant, int]] = [("fp32", BASELINE, train_seed)]
    runs += [(f"fp32 seed+{j}", BASELINE, train_seed + j)
             for j in range(1, args.noise_seeds + 1)]
    runs += [(v.name, v, train_seed) for v in VARIANTS[1:]]

    res: dict[str, dict] = {}
    for label, v, seed in runs:
        model = build_unet(preset, seed=args.seed)  # same initial weights for every run
        losses: list[float] = []
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=LR, loss=LOSS,
                          channels_last=v.channels_last, bf16=v.bf16, max_steps_per_epoch=steps)
        t0 = time.perf_counter()
        train_local(model, train_images, schedule, cfg, seed=seed,
                    on_step=lambda _s, _n, loss, losses=losses: losses.append(loss))
        seconds = time.perf_counter() - t0
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        res[label] = {
            "final_loss": losses[-1],
            "last_k_loss": sum(losses[-last_k:]) / last_k,
            "eval_loss": eval_loss(model, schedule, held_out, batch, args.seed + 12345),
            "seconds": seconds,
            "_flat": flat,
        }
        print(f"    {label:<13} trained {steps} steps in {seconds:6.1f} s: final loss "
              f"{losses[-1]:.4f}, last-{last_k} mean {res[label]['last_k_loss']:.4f}, "
              f"held-out {res[label]['eval_loss']:.4f}", flush=True)

    ref = res["fp32"]
    metrics = ("final_loss", "last_k_loss", "eval_loss")
    for d in res.values():
        d["weight_distance"] = float((d["_flat"] - ref["_flat"]).norm())
    noise_labels = [f"fp32 seed+{j}" for j in range(1, args.noise_seeds + 1)]
    floor = {m: statistics.mean(abs(res[n][m] - ref[m]) for n in noise_labels) for m in metrics}
    floor["weight_distance"] = statistics.mean(res[n]["weight_distance"] for n in noise_labels)
    verdicts = {}
    for v in VARIANTS[1:]:
        d = res[v.name]
        delta = {m: abs(d[m] - ref[m]) for m in metrics}
        ok = (delta["last_k_loss"] <= floor["last_k_loss"]
              and delta["eval_loss"] <= floor["eval_loss"])
        verdicts[v.name] = {"within_noise": ok, "delta": delta,
                            "weight_distance_vs_floor": d["weight_distance"]
                            / max(floor["weight_distance"], 1e-30)}
    for d in res.values():
        del d["_flat"]
    return {"preset": preset, "steps": steps, "batch": batch, "last_k": last_k,
            "held_out_images": int(held_out.shape[0]), "noise_seeds": args.noise_seeds,
            "runs": res, "noise_floor": floor, "verdicts": verdicts}


def print_numerics(chk: dict) -> None:
    k = chk["last_k"]
    floor = chk["noise_floor"]
    print()
    print(f"Numerics: {chk['preset']} trained {chk['steps']} steps (batch {chk['batch']}) with "
          "train_local from the same initial weights and seed under each option; held-out loss "
          f"on {chk['held_out_images']} unseen images with fixed t and noise, in fp32.")
    print(f"Noise floor = |fp32 with another training seed - fp32| (mean over "
          f"{chk['noise_seeds']} seed(s)). Within noise = both |d last-{k}| and |d held-out| "
          "are <= their floor.")
    header = (f"{'run':<14} {'final':>8} {'last-' + str(k):>8} {'held-out':>9} "
              f"{'|d last|':>9} {'|d held|':>9} {'|w - w_fp32|':>13}  verdict")
    print(header)
    print("-" * (len(header) + 8))
    ref = chk["runs"]["fp32"]
    for label, d in chk["runs"].items():
        verdict = ""
        if label in chk["verdicts"]:
            ok = chk["verdicts"][label]["within_noise"]
            verdict = "within noise" if ok else "NOT within noise"
        elif label != "fp32":
            verdict = "(noise floor)"
        else:
            verdict = "(reference)"
        print(f"{label:<14} {d['final_loss']:8.4f} {d['last_k_loss']:8.4f} "
              f"{d['eval_loss']:9.5f} {abs(d['last_k_loss'] - ref['last_k_loss']):9.5f} "
              f"{abs(d['eval_loss'] - ref['eval_loss']):9.5f} {d['weight_distance']:13.3e}  "
              f"{verdict}")
    print(f"{'noise floor':<14} {floor['final_loss']:8.4f} {'':>8} {'':>9} "
          f"{floor['last_k_loss']:9.5f} {floor['eval_loss']:9.5f} "
          f"{floor['weight_distance']:13.3e}")
    for name, v in chk["verdicts"].items():
        print(f"  {name:<14} {'within noise' if v['within_noise'] else 'NOT within noise'}: "
              f"held-out loss off by {v['delta']['eval_loss']:.5f} (floor "
              f"{floor['eval_loss']:.5f}), last-{k} loss off by {v['delta']['last_k_loss']:.5f} "
              f"(floor {floor['last_k_loss']:.5f}); weights moved "
              f"{v['weight_distance_vs_floor']:.2f}x the seed-to-seed distance")


# --------------------------------------------------------------------------------------
# 3: simulator overhead against the same training steps done bare
# --------------------------------------------------------------------------------------


class TrainTimer:
    """Wraps the simulator's reference to train_local to time the training inside it.

    The wrapper adds one Python call per client and round; it changes nothing else.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._original = simulate_module.train_local

    def __enter__(self) -> TrainTimer:
        original = self._original

        def timed(*a, **kw):
            t0 = time.perf_counter()
            result = original(*a, **kw)
            self.seconds += time.perf_counter() - t0
            self.steps += sum(e.steps for e in result.epochs)
            return result

        simulate_module.train_local = timed
        return self

    def __exit__(self, *exc) -> None:
        simulate_module.train_local = self._original


def sim_config(args: argparse.Namespace, out: Path) -> SimulationConfig:
    return SimulationConfig(preset=args.sim_preset, dataset="fashion-mnist", method="full",
                            clients=args.sim_clients, rounds=args.sim_rounds, local_epochs=1,
                            split="iid", seed=args.seed, limit=args.sim_limit, out=str(out),
                            batch_size=args.batch, lr=LR, loss=LOSS, device="cpu",
                            channels_last=False, bf16=False, sample_count=0)


def run_sim_once(args: argparse.Namespace, out: Path) -> tuple[float, dict, TrainTimer]:
    # A real `feddiffuse simulate` starts in a fresh process and parses the IDX files; drop
    # the in-process parse cache so the load is part of the measured time here too.
    cache = getattr(fmnist_module, "_parse_cached", None)
    if cache is not None and hasattr(cache, "cache_clear"):
        cache.cache_clear()
    with TrainTimer() as timer:
        t0 = time.perf_counter()
        report = run_simulation(sim_config(args, out), log=lambda _line: None)
        wall = time.perf_counter() - t0
    return wall, report, timer


def batch_sizes(n: int, batch: int) -> list[int]:
    return [min(batch, n - s) for s in range(0, n, batch)]


def planned_workload(args: argparse.Namespace, dataset_size: int) -> list[list[int]]:
    """Per round, per client: the batch sizes the simulator's train_local will use."""
    n = min(args.sim_limit, dataset_size)
    parts = partition_indices(n, args.sim_clients, "iid", seed=args.seed)
    return [[batch_sizes(len(p), args.batch) for p in parts] for _ in range(args.sim_rounds)]


def reported_workload(report: dict, batch: int) -> list[list[int]]:
    """Per round, per client: the batch sizes the simulator's train_local used."""
    return [[batch_sizes(int(c["samples"]), batch) for c in rnd["clients"]]
            for rnd in report["rounds"]]


def run_raw_once(model: torch.nn.Module, images: torch.Tensor, workload: list[list[int]],
                 seed: int) -> tuple[float, int, int]:
    """The same training steps as the simulator, bare: no codec, no state copies, no files."""
    schedule = DiffusionSchedule.linear()
    steps = seen = 0
    t0 = time.perf_counter()
    for r, per_client in enumerate(workload):
        offset = 0
        for i, sizes in enumerate(per_client):
            n = sum(sizes)
            client = images[offset:offset + n]
            offset += n
            optimizer = torch.optim.Adam(model.parameters(), lr=LR)  # fresh each round
            order = torch.randperm(n, generator=make_generator(seed + 1000 * r + i))
            gen = make_generator(seed + 1000 * r + i + 1)
            start = 0
            for b in sizes:
                batch = client.index_select(0, order[start:start + b])
                start += b
                train_step(model, optimizer, schedule, batch, gen, BASELINE)
                steps += 1
                seen += b
    return time.perf_counter() - t0, steps, seen


def sim_overhead(images: torch.Tensor, args: argparse.Namespace, tmp: Path) -> dict:
    model = build_unet(args.sim_preset, seed=args.seed)
    model.train()
    workload = planned_workload(args, images.shape[0])
    # Warm up every batch shape either side will see (oneDNN builds primitives per shape),
    # so that neither side pays first-use costs the other does not.
    warm_opt = torch.optim.Adam(model.parameters(), lr=LR)
    for b in sorted({b for per_client in workload for sizes in per_client for b in sizes}):
        for _ in range(max(args.warmup, 1)):
            train_step(model, warm_opt, DiffusionSchedule.linear(), images[:b],
                       make_generator(args.seed), BASELINE)
    sims: list[dict] = []
    raws: list[dict] = []
    run_index = 0

    def do_sim() -> None:
        nonlocal run_index
        run_index += 1
        wall, report, timer = run_sim_once(args, tmp / f"sim-{run_index}")
        if reported_workload(report, args.batch) != workload:
            raise RuntimeError("the simulator trained on other batches than planned")
        round_secs = sum(r["seconds"] for r in report["rounds"])
        sims.append({"wall": wall, "report_seconds": report["seconds"],
                     "rounds_seconds": round_secs, "train_local_seconds": timer.seconds,
                     "steps": timer.steps})
        print(f"    simulator: {wall:6.2f} s ({timer.steps} steps; train_local "
              f"{timer.seconds:.2f} s, rest of the rounds {round_secs - timer.seconds:.2f} s, "
              f"outside the rounds {wall - round_secs:.2f} s)", flush=True)

    def do_raw() -> None:
        wall, steps, seen = run_raw_once(model, images, workload, args.seed)
        raws.append({"wall": wall, "steps": steps, "images": seen})
        print(f"    bare loop: {wall:6.2f} s ({steps} steps, {seen} images)", flush=True)

    for p in range(args.sim_pairs):  # A B, B A, A B, ...: drift hits both sides alike
        if p % 2 == 0:
            do_sim()
            do_raw()
        else:
            do_raw()
            do_sim()

    sim_steps = {s["steps"] for s in sims}
    raw_steps = {r["steps"] for r in raws}
    if sim_steps != raw_steps:
        raise RuntimeError(f"step counts differ: simulator {sim_steps}, bare loop {raw_steps}")
    sim_med = median([s["wall"] for s in sims])
    raw_med = median([r["wall"] for r in raws])
    sim_best = min(s["wall"] for s in sims)
    raw_best = min(r["wall"] for r in raws)
    pair_overheads = [s["wall"] / r["wall"] - 1 for s, r in zip(sims, raws, strict=True)]
    tl_med = median([s["train_local_seconds"] for s in sims])
    return {
        "preset": args.sim_preset, "clients": args.sim_clients, "rounds": args.sim_rounds,
        "limit": args.sim_limit, "batch": args.batch, "pairs": args.sim_pairs,
        "steps": raws[0]["steps"], "images": raws[0]["images"],
        "batch_sizes": workload,
        "sim_seconds": sim_med, "raw_seconds": raw_med,
        "overhead": sim_med / raw_med - 1,
        "best_sim_seconds": sim_best, "best_raw_seconds": raw_best,
        "best_overhead": sim_best / raw_best - 1,
        "pair_overheads": pair_overheads,
        "train_local_seconds": tl_med,
        "train_local_overhead": tl_med / raw_med - 1,
        "outside_train_local_seconds": median(
            [s["wall"] - s["train_local_seconds"] for s in sims]),
        "outside_rounds_seconds": median([s["wall"] - s["rounds_seconds"] for s in sims]),
        # Within each simulator run: time outside train_local / time inside it. Both parts come
        # from the same run, so this holds up when the machine is busy.
        "in_run_overhead": median([(s["wall"] - s["train_local_seconds"])
                                   / s["train_local_seconds"] for s in sims]),
        "sims": sims, "raws": raws,
    }


def print_overhead(ov: dict) -> None:
    print()
    print(f"Simulator overhead: {ov['preset']}, method full, {ov['clients']} clients, "
          f"{ov['rounds']} round(s) x 1 local epoch, limit {ov['limit']}, batch {ov['batch']}: "
          f"{ov['steps']} training steps over {ov['images']} images on both sides "
          f"(median of {ov['pairs']} interleaved pair(s))")
    raw, sim = ov["raw_seconds"], ov["sim_seconds"]
    rows = [
        ("bare training steps", raw, ""),
        ("run_simulation, total", sim, f"{100 * ov['overhead']:+.1f} %"),
        ("  of which train_local", ov["train_local_seconds"],
         f"{100 * ov['train_local_overhead']:+.1f} % vs bare"),
        ("  of which everything else", ov["outside_train_local_seconds"],
         f"{100 * ov['outside_train_local_seconds'] / raw:.1f} % of bare"),
        ("    (outside the rounds)", ov["outside_rounds_seconds"],
         f"{100 * ov['outside_rounds_seconds'] / raw:.1f} % of bare"),
    ]
    for name, sec, note in rows:
        print(f"  {name:<28} {sec:8.2f} s   {note}")
    pairs = ", ".join(f"{100 * o:+.1f} %" for o in ov["pair_overheads"])
    ok = ov["overhead"] <= OVERHEAD_TARGET
    print(f"  overhead = sim / bare - 1 = {100 * ov['overhead']:+.1f} % (medians; per pair: "
          f"{pairs}; fastest sim / fastest bare: {100 * ov['best_overhead']:+.1f} %)")
    print(f"  within each simulator run, time outside train_local / time inside it: "
          f"{100 * ov['in_run_overhead']:+.1f} % (the same comparison, robust to a busy machine,"
          " but blind to any slowness of train_local itself)")
    print(f"  target <= {100 * OVERHEAD_TARGET:.0f} %: {'met' if ok else 'NOT met'}")


def profile_sim(args: argparse.Namespace, tmp: Path, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run_sim_once(args, tmp / "sim-profiled")
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (default 2; use 1 on a busy machine)")
    p.add_argument("--batch", type=int, default=128,
                   help="training batch size everywhere (default 128)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per measurement block (default: tiny 8, paper-fmnist 4; "
                        "--quick: 2 and 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per variant first (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds over the variants (default 3, --quick 1)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS,
                   help="presets whose speed is measured (default both)")
    p.add_argument("--check-preset", default="tiny", choices=PRESETS,
                   help="preset of the numerics check (default tiny)")
    p.add_argument("--check-steps", type=int, default=None,
                   help="training steps of the numerics check (default 16, --quick 4)")
    p.add_argument("--check-eval", type=int, default=None,
                   help="held-out images for the numerics check (default 512, --quick 128)")
    p.add_argument("--noise-seeds", type=int, default=1,
                   help="extra fp32 seeds that set the noise floor (default 1)")
    p.add_argument("--sim-preset", default="tiny", choices=PRESETS,
                   help="preset of the simulator run (default tiny)")
    p.add_argument("--sim-clients", type=int, default=2, help="simulated clients (default 2)")
    p.add_argument("--sim-rounds", type=int, default=None, help="default 2, --quick 1")
    p.add_argument("--sim-limit", type=int, default=None,
                   help="images for the simulator (default 2048, --quick 512)")
    p.add_argument("--sim-pairs", type=int, default=None,
                   help="(simulator, bare loop) pairs, alternating order (default 2, --quick 1)")
    p.add_argument("--profile-sim", action="store_true",
                   help="also run the simulator once under cProfile and print where time goes")
    p.add_argument("--skip", nargs="+", default=[], choices=("speed", "numerics", "sim"),
                   help="parts to leave out")
    p.add_argument("--seed", type=int, default=0, help="seed of models and batches (default 0)")
    p.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="a very short run (smoke test)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"warmup": (1, 1), "repeats": (3, 1), "check_steps": (16, 4),
                "check_eval": (512, 128), "sim_rounds": (2, 1), "sim_limit": (2048, 512),
                "sim_pairs": (2, 1)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    for name in ("threads", "batch", "repeats", "check_steps", "check_eval", "noise_seeds",
                 "sim_clients", "sim_rounds", "sim_limit", "sim_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.steps is not None and args.steps < 1):
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cpu_started = time.process_time()
    env = environment()
    print_environment(env)
    t0 = time.perf_counter()
    images = load_fashion_mnist("train").images
    print(f"Fashion-MNIST train: {tuple(images.shape)} uint8, loaded in "
          f"{time.perf_counter() - t0:.2f} s")
    for name in set(args.presets) | {args.check_preset, args.sim_preset}:
        cfg = get_preset(name).config
        if (cfg.channels, cfg.image_size) != tuple(images.shape[1:3]):
            raise SystemExit(f"preset {name} is not 1x28x28; this benchmark feeds Fashion-MNIST")
    out: dict = {"environment": env, "args": vars(args)}

    if "speed" not in args.skip:
        print(f"\n[1/3] speed: {', '.join(v.name for v in VARIANTS)}, interleaved, "
              f"{args.repeats} round(s), warm-up {args.warmup} step(s) per variant")
        results = []
        for preset in args.presets:
            steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)[preset]
            results.append(measure_speed(preset, images, args, steps))
        print_speed_table(results)
        out["speed"] = results

    if "numerics" not in args.skip:
        print(f"\n[2/3] numerics: {args.check_preset}, {args.check_steps} steps per run")
        chk = numerics_check(images, args)
        print_numerics(chk)
        out["numerics"] = chk

    if "sim" not in args.skip or args.profile_sim:
        with tempfile.TemporaryDirectory(prefix="feddiffuse-bench-") as tmp:
            if "sim" not in args.skip:
                print(f"\n[3/3] simulator overhead: {args.sim_pairs} pair(s)")
                ov = sim_overhead(images, args, Path(tmp))
                print_overhead(ov)
                out["simulator"] = ov
            if args.profile_sim:
                print("\ncProfile of one simulator run:")
                text = profile_sim(args, Path(tmp))
                print(text)
                out["simulator_profile"] = text

    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out["seconds"] = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    env["cpu_share"] = cpu / (out["seconds"] * min(args.threads, os.cpu_count() or 1))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in env['loadavg_end'] or [])}; "
          f"benchmark took {out['seconds']:.0f} s and got {100 * env['cpu_share']:.0f} % of "
          f"the CPU time its {args.threads} thread(s) could have used")
    if env["cpu_share"] < 0.85 and out["seconds"] > 30:
        print("  WARNING: the CPU was shared with other work during the run; absolute numbers "
              "are pessimistic and ratios noisier than usual. Rerun on a quiet machine.")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
        print(f"numbers written to {path}")
    return 0


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
