"""`feddiffuse experiment`: run a grid of simulations, resumably, and tabulate and plot it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import user_errors
from ..codecs import CODEC_HELP
from ..errors import UserError
from ..experiment import (
    cell_config,
    finished_report,
    grid_cells,
    load_grid,
    repeat_counts,
    run_grid,
    with_overrides,
)
from ..experiment_protocol import (
    CLIP_HELP,
    PERSONAL_MODEL_HELP,
    PROTOCOL_HELP,
    SAMPLER_HELP,
    STEPS_HELP,
    get_protocol,
)
from ..experiment_report import write_report
from ..privacy.options import (
    DP_BUDGET_HELP,
    DP_CLIP_HELP,
    DP_DELTA_HELP,
    DP_HELP,
    DP_NOISE_HELP,
)


def experiment(
    grid: Annotated[str, typer.Argument(
        help="A grid TOML file, or a shipped grid: cpu-small, paper-fmnist.")],
    out: Annotated[str, typer.Option(help="Output folder (a rerun resumes it).")],
    dry_run: Annotated[bool, typer.Option(
        help="List the configurations with their repeats, and the cells and which are "
             "finished; run nothing.")] = False,
    jobs: Annotated[int, typer.Option(
        help="Cells run at once, in worker processes (2 on a 2-core machine: one thread "
             "each, the fastest there).")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads per cell (default: torch's choice, or the cores divided "
             "by --jobs).")] = None,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    verbose: Annotated[bool, typer.Option(
        help="Print every cell's log (always written to its log.txt).")] = False,
    protocol: Annotated[str | None, typer.Option(
        help=PROTOCOL_HELP + " Default: the grid's.")] = None,
    sampler: Annotated[str | None, typer.Option(help=SAMPLER_HELP)] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    clip_x0: Annotated[bool | None, typer.Option("--clip-x0/--no-clip-x0",
                                                 help=CLIP_HELP)] = None,
    personal_model: Annotated[str | None, typer.Option(help=PERSONAL_MODEL_HELP)] = None,
    eval_every: Annotated[int | None, typer.Option(
        help="Also evaluate every cell after every N rounds: metric curves over rounds and "
             "cumulative bytes (default: the grid's; 0: only the final models).")] = None,
    uplink_codec: Annotated[str | None, typer.Option(
        help=f"Codec of every cell's uploads (default: the grid's, else fp32): {CODEC_HELP}"
    )] = None,
    downlink_codec: Annotated[str | None, typer.Option(
        help="Codec of every cell's downloads (default: the grid's, else fp32).")] = None,
    dp: Annotated[str | None, typer.Option(help=DP_HELP + " Default: the grid's.")] = None,
    dp_clip: Annotated[float | None, typer.Option(help=DP_CLIP_HELP)] = None,
    dp_noise_multiplier: Annotated[float | None, typer.Option(help=DP_NOISE_HELP)] = None,
    dp_delta: Annotated[float | None, typer.Option(help=DP_DELTA_HELP)] = None,
    dp_epsilon_budget: Annotated[float | None, typer.Option(help=DP_BUDGET_HELP)] = None,
) -> None:
    """Run every unfinished cell of GRID and write results.csv, results.md and the plots.

    Options given here replace the grid's [simulation] settings in every cell (a cell already
    finished with other settings is then an error, never mixed into the tables).
    """
    with user_errors():
        spec, text, path = load_grid(grid)
        if threads is not None and threads < 1:
            raise UserError("--threads must be at least 1.")
        if jobs < 1:
            raise UserError("--jobs must be at least 1.")
        if protocol is not None:
            get_protocol(protocol)
        spec = with_overrides(spec, protocol=protocol, sampler=sampler, eval_steps=steps,
                              clip_x0=clip_x0, personal_model=personal_model,
                              eval_every=eval_every, uplink_codec=uplink_codec,
                              downlink_codec=downlink_codec, dp=dp, dp_clip=dp_clip,
                              dp_noise_multiplier=dp_noise_multiplier, dp_delta=dp_delta,
                              dp_epsilon_budget=dp_epsilon_budget)
        cells = grid_cells(spec)
        typer.echo(f"grid {spec.name} ({path}): {len(cells)} cells -> {out}; protocol "
                   f"{spec.simulation.get('protocol', 'product')}")
        if dry_run:
            counts = repeat_counts(cells)
            typer.echo(f"{len(counts)} configurations (repeats):")
            for configuration, n in counts.items():
                typer.echo(f"  {configuration}: {n} repeat{'s' if n > 1 else ''}")
            typer.echo("cells:")
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
