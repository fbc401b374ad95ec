#!/usr/bin/env python3
"""Quality per CPU-minute: train each training-recipe variant on the same budget, score it.

    .venv/bin/python benchmarks/recipe.py                     # the variants below, ~30 min
    .venv/bin/python benchmarks/recipe.py --only paper fast   # a subset
    .venv/bin/python benchmarks/recipe.py --json recipe.json  # also write every number

Every variant runs the product's own simulator (`run_simulation`) on the same federation
(default: 3 IID clients, tiny preset, 6,000 Fashion-MNIST images, 10 rounds of 1 local
epoch, seed 0), so each sees the same images; a variant with a smaller batch takes more
optimiser steps over them (the batch is part of a recipe). Its
final model, the one a user samples from (the EMA when the recipe keeps one), is scored with
`fd_fmnist` and KID on N DDIM-50 samples against the real-vs-real floor of the same N. The
table prints fd_fmnist, KID, the ratio to the first variant, training images/s and the
training seconds, side by side. Speeds on a shared machine are noisy; the ratios of fd are
what the recipe choice rests on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from feddiffuse.shared.recipes import FAST, PAPER, Recipe
from feddiffuse.shared.simulate import SimulationConfig, run_simulation

# Each variant changes one thing against `fast` (the product's default), plus the paper's
# recipe and a plain standard one (AdamW 1e-3 with warm-up, MSE, bf16, constant lr, EMA).
PLAIN = Recipe(name="plain", optimizer="adamw", lr=1e-3, warmup_steps=100, loss="mse",
               bf16=True, ema_decay=0.5, batch_size=128)
VARIANTS: dict[str, Recipe] = {
    "paper": PAPER,
    "plain": PLAIN,
    "fast": FAST,
    "fast-ema": replace(FAST, name="fast-ema", ema_decay=0.5),
    "fast-no-minsnr": replace(FAST, name="fast-no-minsnr", loss_weighting="none"),
    "fast-constant-lr": replace(FAST, name="fast-constant-lr", lr_schedule="constant",
                                lr=1e-3),
    "fast-batch16": replace(FAST, name="fast-batch16", batch_size=16),
    "fast-batch64": replace(FAST, name="fast-batch64", batch_size=64),
    "fast-server-lr1": replace(FAST, name="fast-server-lr1", server_lr=1.0),
    "fast-server-lr2": replace(FAST, name="fast-server-lr2", server_lr=2.0),
    "fast-lr1e-3": replace(FAST, name="fast-lr1e-3", lr=1e-3),
    "fast-keep-optimizer": replace(FAST, name="fast-keep-optimizer", keep_optimizer=True),
    "fast-keep-optimizer-batch16": replace(FAST, name="fast-keep-optimizer-batch16",
                                           keep_optimizer=True, batch_size=16),
    "fast-keep-optimizer-batch8": replace(FAST, name="fast-keep-optimizer-batch8",
                                          keep_optimizer=True, batch_size=8),
    "fast-keep-optimizer-batch16-lr3e-3": replace(
        FAST, name="fast-keep-optimizer-batch16-lr3e-3", keep_optimizer=True, batch_size=16,
        lr=3e-3),
    "fast-keep-optimizer-server-lr2": replace(FAST, name="fast-keep-optimizer-server-lr2",
                                              keep_optimizer=True, server_lr=2.0),
    "fast-fp32": replace(FAST, name="fast-fp32", bf16=False),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=6000, help="Fashion-MNIST images in all")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of every variant (default: each variant's own; the "
                        "paper's is the preset's 128)")
    p.add_argument("--samples", type=int, default=500, help="evaluation samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(VARIANTS)
    rows = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            recipe = VARIANTS[name]
            if args.batch is not None:
                recipe = replace(recipe, batch_size=args.batch)
            config = SimulationConfig(
                preset="tiny", dataset="fashion-mnist", method="full", clients=args.clients,
                rounds=args.rounds, local_epochs=args.local_epochs, split="iid",
                seed=args.seed, limit=args.limit, out=str(Path(tmp) / name), device="cpu",
                sample_count=0, eval_samples=args.samples, eval_metrics="fd_fmnist,kid")
            print(f"== {name}: {recipe}", flush=True)
            report = run_simulation(config, log=lambda m: print("   ", m, flush=True),
                                    recipe=recipe)
            images = sum(c["samples"] for c in report["rounds"][0]["clients"])
            images *= args.rounds * args.local_epochs
            train_s = sum(r["seconds"] for r in report["rounds"])
            ev = report["evaluation"]["metrics"]
            rows.append({"variant": name, "batch": recipe.batch_size or 128,
                         "fd_fmnist": ev["fd_fmnist"]["value"],
                         "fd_floor": ev["fd_fmnist"]["real_vs_real"],
                         "kid": ev["kid_fmnist"]["value"], "images": images,
                         "train_seconds": train_s, "images_per_s": images / train_s})
            print(f"   -> fd_fmnist {rows[-1]['fd_fmnist']:.2f}, {train_s:.0f} s", flush=True)
    base = rows[0]["fd_fmnist"]
    print(f"\n{args.clients} IID clients, tiny, {args.limit} images, {args.rounds} rounds x "
          f"{args.local_epochs} epoch(s), {args.samples} DDIM-50 samples "
          f"(fd_fmnist floor {rows[0]['fd_floor']:.2f}); load average {os.getloadavg()}")
    print(f"| variant | batch | fd_fmnist | vs {rows[0]['variant']} | KID | train img/s | "
          "train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['fd_fmnist']:.2f} | "
              f"{r['fd_fmnist'] / base:.2f}x | "
              f"{r['kid']:.4f} | {r['images_per_s']:.0f} | {r['train_seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
