#!/usr/bin/env python3
"""One cell of the paper's table on a GPU, under the authors' protocol, beside their figures.

    python packaging/gpu/paper_cell.py [--out runs/gpu-paper-cell] [--device cuda]
        [--cells full,udec] [--with-baseline] [--seed 0]
    python packaging/gpu/paper_cell.py --smoke [--out DIR]     (CPU-sized, for CI)

Runs `paper-fmnist`, K = 5, IID, E = 5, R = 15 on all 60,000 Fashion-MNIST images with
`--protocol paper` (the paper recipe: Adam 1e-4 fresh each round, Huber, batch 128, fp32;
partition seed 2023), and scores Inception FID on 1,000 ancestral DDPM samples over all
1,000 steps without x0 clipping: for `full` the global model, for `udec` every client's last
locally trained model, the mean over clients (pooled beside it). `--with-baseline` adds the
authors' centralised baseline (one client, 15 rounds of one epoch, Adam reset every round),
so that the ratios the paper's conclusions rest on can be compared, not only absolute FIDs
(the authors exported images without rescaling, so their absolute FIDs are not standard).

It prints one line per cell with the FID, the authors' figure (handbook paper.md: full
39.44 ± 4.16, udec 51.10 ± 14.62, centralised 42.5; means over their runs), the ratio of the
two, the wall time of the cell, and writes OUT/summary.json. Each cell's own report,
weights and log are in OUT/<cell>/ (`feddiffuse simulate`'s layout). A cell whose
report.json exists is not run again.

`--smoke` runs the same code at a CPU size (the tiny preset, 60 images, 1 round of 1 epoch,
fd_fmnist on 4 DDPM samples respaced onto 3 steps) to prove the script works; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The authors' Fashion-MNIST FIDs (paper.md, section 6; mean ± std over their runs).
AUTHORS = {"full": (39.44, 4.16), "udec": (51.10, 14.62), "centralised": (42.5, None)}
CELLS = ("full", "udec", "centralised")


@dataclass(frozen=True)
class Size:
    preset: str
    limit: int | None
    clients: int
    rounds: int
    local_epochs: int
    eval_samples: int
    eval_steps: int
    metric: str
    sample_count: int


FULL_SIZE = Size("paper-fmnist", None, 5, 15, 5, 1000, 1000, "fid", 64)
SMOKE_SIZE = Size("tiny", 60, 5, 1, 1, 4, 3, "fd_fmnist", 0)


def cell_config(cell: str, size: Size, out: Path, device: str, seed: int):
    from feddiffuse.shared.simulate import SimulationConfig

    centralised = cell == "centralised"
    return SimulationConfig(
        preset=size.preset, dataset="fashion-mnist", method="full" if centralised else cell,
        clients=1 if centralised else size.clients,
        rounds=size.rounds,
        local_epochs=1 if centralised else size.local_epochs, split="iid", seed=seed,
        limit=size.limit, out=str(out / cell), protocol="paper", batch_size=128,
        device=device, sample_count=size.sample_count, eval_samples=size.eval_samples,
        eval_steps=size.eval_steps, eval_metrics=size.metric, eval_personal="each")


def run_cell(cell: str, size: Size, out: Path, device: str, seed: int) -> dict:
    from feddiffuse.shared.simulate import run_simulation

    config = cell_config(cell, size, out, device, seed)
    report_path = Path(config.out) / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        ran = False
    else:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        with open(Path(config.out) / "log.txt", "w", encoding="utf-8") as log_file:
            def log(message: str) -> None:
                log_file.write(message + "\n")
                log_file.flush()
            report = run_simulation(config, log=log)
        ran = True
    evaluation = report["evaluation"]
    value = evaluation["headline"][size.metric]
    spread = (evaluation.get("client_mean") or {}).get(size.metric, {}).get("std")
    pooled = (evaluation["metrics"][size.metric]["value"]
              if evaluation["models"] == "personal" else None)
    return {"cell": cell, "metric": size.metric, "value": value, "clients_std": spread,
            "pooled": pooled, "samples_per_model": size.eval_samples,
            "sampler": evaluation["sampler"], "device": report["device"],
            "seconds": round(float(report["seconds"]), 1), "ran_now": ran,
            "authors": AUTHORS[cell][0], "authors_std": AUTHORS[cell][1],
            "ratio_to_authors": value / AUTHORS[cell][0] if value else None}


def line(row: dict) -> str:
    spread = f" ± {row['clients_std']:.2f} over clients" if row["clients_std"] else ""
    pooled = f", pooled {row['pooled']:.2f}" if row["pooled"] is not None else ""
    authors = f"{row['authors']:.2f}" + (f" ± {row['authors_std']:.2f}"
                                         if row["authors_std"] else "")
    return (f"{row['cell']:<12} {row['metric']} {row['value']:.2f}{spread}{pooled}  | "
            f"authors {authors}  | ratio {row['ratio_to_authors']:.2f}  | "
            f"{row['seconds']:.0f} s on {row['device']['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-paper-cell")
    parser.add_argument("--device", default=None,
                        help="cuda (the default), or cpu; --smoke defaults to cpu")
    parser.add_argument("--cells", default="full,udec",
                        help=f"comma-separated, of: {', '.join(CELLS)}")
    parser.add_argument("--with-baseline", action="store_true",
                        help="also run the authors' centralised baseline (ratios)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a CPU-sized run, for CI")
    args = parser.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if args.with_baseline and "centralised" not in cells:
        cells.append("centralised")
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        print(f"Unknown cell(s) {', '.join(unknown) or '(none)'}; choose from: "
              f"{', '.join(CELLS)}.", file=sys.stderr)
        return 2
    size = SMOKE_SIZE if args.smoke else FULL_SIZE
    device = args.device or ("cpu" if args.smoke else "cuda")
    out = Path(args.out)

    from feddiffuse.shared.errors import UserError

    started = time.perf_counter()
    rows = []
    try:
        for cell in cells:
            print(f"running {cell} ({'smoke' if args.smoke else 'paper size'}, {device}); "
                  f"log in {out / cell / 'log.txt'}", flush=True)
            rows.append(run_cell(cell, size, out, device, args.seed))
            print(line(rows[-1]), flush=True)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    base = next((r for r in rows if r["cell"] == "centralised"), None)
    if base and base["value"]:
        for row in rows:
            if row["cell"] != "centralised":
                ours = row["value"] / base["value"]
                theirs = row["authors"] / AUTHORS["centralised"][0]
                row["ratio_to_centralised"] = ours
                print(f"{row['cell']:<12} / centralised: {ours:.2f} (authors {theirs:.2f})")
    summary = {"smoke": args.smoke, "size": size.__dict__, "device": device,
               "protocol": "paper", "cells": rows,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wall time {summary['wall_seconds']:.0f} s; summary {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
