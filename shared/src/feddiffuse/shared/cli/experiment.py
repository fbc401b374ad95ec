"""`feddiffuse experiment`: run a grid of simulations, resumably, and tabulate and plot it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..errors import UserError
from ..experiment import cell_config, finished_report, grid_cells, load_grid, run_grid
from ..experiment_report import write_report


def experiment(
    grid: Annotated[str, typer.Argument(
        help="A grid TOML file, or a shipped grid: cpu-small, paper-fmnist.")],
    out: Annotated[str, typer.Option(help="Output folder (a rerun resumes it).")],
    dry_run: Annotated[bool, typer.Option(
        help="List the cells and which are finished; run nothing.")] = False,
    jobs: Annotated[int, typer.Option(
        help="Cells run at once, in worker processes (2 on a 2-core machine: one thread "
             "each, the fastest there).")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads per cell (default: torch's choice, or the cores divided "
             "by --jobs).")] = None,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    verbose: Annotated[bool, typer.Option(
        help="Print every cell's log (always written to its log.txt).")] = False,
) -> None:
    """Run every unfinished cell of GRID and write results.csv, results.md and the plots."""
    with user_errors():
        spec, text, path = load_grid(grid)
        if threads is not None and threads < 1:
            raise UserError("--threads must be at least 1.")
        if jobs < 1:
            raise UserError("--jobs must be at least 1.")
        cells = grid_cells(spec)
        typer.echo(f"grid {spec.name} ({path}): {len(cells)} cells -> {out}")
        if dry_run:
            for cell in cells:
                config = cell_config(spec, cell, Path(out))
                done = finished_report(config) is not None
                typer.echo(f"  {cell.id}: {'finished' if done else 'to run'}")
            return
        started = time.perf_counter()
        outcomes = run_grid(spec, out, text, log=typer.echo, quiet_cells=not verbose,
                            jobs=jobs, threads=threads)
        written = write_report(spec, outcomes, out, plots=plots)
        ran = sum(o.ran for o in outcomes)
        typer.echo(f"{ran} cell(s) run, {len(outcomes) - ran} finished earlier, "
                   f"{time.perf_counter() - started:.0f} s; wrote "
                   + ", ".join(p.name for p in written))
