#!/usr/bin/env python3
"""A small privacy-utility frontier: fd_fmnist against epsilon, central and local DP, full and
udec, beside the non-private run, all on the same federation.

    .venv/bin/python benchmarks/dp_frontier.py                  # the cells below
    .venv/bin/python benchmarks/dp_frontier.py --json out.json  # also write every number

Every cell runs the product's simulator (`run_simulation`): K IID clients, tiny preset, the
`fast` recipe, R rounds of E epochs, seed 0, so every cell sees the same images and starts
from the same model. Each cell's final model(s) (udec: every client's personal model, the
samples shared among them) are scored with fd_fmnist on N DDIM-50 samples, pooled; the
epsilon is the accountant's after R rounds at delta 1e-5. The budget is tiny (a 2-core CPU
shared with other work): read it as an order of magnitude, not a measurement of the method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from feddiffuse.shared.simulate import SimulationConfig, run_simulation

# (mode, noise multiplier); None: no DP
SETTINGS: list[tuple[str | None, float | None]] = [
    (None, None), ("central", 1.0), ("central", 0.03), ("local", 0.03)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=250, help="Fashion-MNIST images in all")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=100, help="evaluation samples per cell")
    p.add_argument("--methods", nargs="+", default=["full", "udec"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for mode, z in SETTINGS:
                name = f"{method}-{mode or 'none'}-{z or 0:g}"
                dp = {} if mode is None else {"dp": mode, "dp_clip": args.clip,
                                              "dp_noise_multiplier": z, "dp_delta": 1e-5}
                config = SimulationConfig(
                    preset="tiny", dataset="fashion-mnist", method=method,
                    clients=args.clients, rounds=args.rounds, local_epochs=args.local_epochs,
                    split="iid", seed=0, limit=args.limit, out=str(Path(tmp) / name),
                    device="cpu", sample_count=0, eval_samples=args.samples,
                    eval_metrics="fd_fmnist", eval_personal="split", **dp)
                print(f"== {name}", flush=True)
                report = run_simulation(config, log=lambda m: print("   ", m, flush=True))
                ev = report["evaluation"]["metrics"]["fd_fmnist"]
                norms = [c["update_norm"] for r in report["rounds"] for c in r["clients"]
                         if "update_norm" in c]
                rows.append({"method": method, "dp": mode or "none", "noise_multiplier": z,
                             "epsilon": (report["privacy"]["epsilon"] if report["privacy"]
                                         else None),
                             "fd_fmnist": ev["value"], "floor": ev["real_vs_real"],
                             "clipped": sum(n > args.clip for n in norms),
                             "updates": len(norms),
                             "median_norm": sorted(norms)[len(norms) // 2] if norms else None,
                             "seconds": report["seconds"]})
                print(f"   -> fd_fmnist {ev['value']:.2f}", flush=True)
    print(f"\nK={args.clients} IID, tiny, {args.limit} images, R={args.rounds} x "
          f"E={args.local_epochs}, clip {args.clip:g}, delta 1e-5, {args.samples} DDIM-50 "
          f"samples (fd_fmnist floor {rows[0]['floor']:.2f}); "
          f"{time.perf_counter() - started:.0f} s, load average {os.getloadavg()}")
    print("| method | DP | Z | epsilon | fd_fmnist | clipped updates | median norm | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        med = "-" if r["median_norm"] is None else f"{r['median_norm']:.3g}"
        clipped = "-" if not r["updates"] else f"{r['clipped']}/{r['updates']}"
        print(f"| {r['method']} | {r['dp']} | {r['noise_multiplier'] or '-'} | {eps} | "
              f"{r['fd_fmnist']:.2f} | {clipped} | {med} | {r['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
