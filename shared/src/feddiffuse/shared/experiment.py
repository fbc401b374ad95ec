"""Experiment grids: many simulations from one TOML file, resumable, with tables and plots.

A grid file names the settings shared by every cell (``[simulation]``, any field of
:class:`~feddiffuse.shared.simulate.SimulationConfig` except the ones the grid varies) and one
or more ``[[sweep]]`` blocks, each a product of methods x clients x splits x local epochs,
each with the grid's ``repeats`` or its own. The union of the sweeps (a configuration in two
sweeps runs the larger number of repeats), plus the centralised baselines (K = 1), are the
cells. Repeat r uses seed ``seed + r`` in every cell, so methods are compared on the same
initial model and partition within a repeat (a paired design).

Centralised baselines: ``centralised_epochs`` (one number or a list; default: R x E for each
federated E) epochs of one client, run as ``centralised_mode = "one-round"`` (one round of
that many epochs, one optimiser) or ``"rounds"`` (that many rounds of one epoch each, as the
authors ran it: with a recipe that starts a fresh optimiser each round, Adam resets every
epoch).

Each cell runs in ``OUT/cells/<cell id>/`` and is finished once its ``report.json`` exists (the
simulator writes it last, atomically); finished cells are never rerun. Then
:mod:`feddiffuse.shared.experiment_report` writes ``results.csv``, ``results.md`` and the plots.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .payloads import LinkCodecs
from .simulate import SimulationConfig, run_simulation
from .wire import atomic_write_bytes

Log = Callable[[str], None]

GRID_PACKAGE = "feddiffuse.shared.grids"
VARIED = ("method", "clients", "split", "local_epochs", "seed", "out")
CENTRALISED = "centralised"


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(min_length=1)
    clients: list[int] = Field(min_length=1)
    splits: list[str] = Field(default_factory=lambda: ["iid"], min_length=1)
    local_epochs: list[int] = Field(default_factory=lambda: [1], min_length=1)
    # Codecs, each "C" (both directions) or "UPLINK/DOWNLINK"; none: the [simulation]'s.
    codecs: list[str] = Field(default_factory=lambda: [""], min_length=1)
    repeats: int | None = Field(default=None, ge=1)  # None: the grid's


class GridSpec(BaseModel):
    """A grid file, validated."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    repeats: int = Field(default=1, ge=1)
    seed: int = 0
    centralised: bool = True
    # Epochs of the centralised baseline(s); None: rounds x E, the federated cells' data
    # passes, one baseline per federated E.
    centralised_epochs: int | list[int] | None = None
    centralised_mode: Literal["one-round", "rounds"] = "one-round"
    simulation: dict[str, Any] = Field(default_factory=dict)
    sweep: list[Sweep] = Field(min_length=1)


@dataclass(frozen=True)
class Cell:
    """One simulation of the grid."""

    method: str
    clients: int
    split: str
    local_epochs: int
    rounds: int
    repeat: int
    seed: int
    centralised: bool = False
    group_epochs: int = 0  # the federated E this cell is compared with (baselines)
    codecs: str = ""  # "UPLINK/DOWNLINK" from the sweep; "": the [simulation]'s

    @property
    def links(self) -> tuple[str, str] | None:
        if not self.codecs:
            return None
        up, _, down = self.codecs.partition("/")
        return up, down or up

    @property
    def epochs(self) -> int:
        """Passes over the data in the whole run (R x E)."""
        return self.rounds * self.local_epochs

    @property
    def configuration(self) -> str:
        """The id without the repeat: the cells that are repeats of one another share it."""
        if self.centralised:  # the baseline of the E = group_epochs cells, or a fixed one
            rounds = "-rounds" if self.rounds > 1 else ""
            if self.group_epochs:
                return f"{CENTRALISED}-e{self.group_epochs}{rounds}"
            if self.rounds > 1:
                return f"{CENTRALISED}-{self.rounds}rounds-e{self.local_epochs}"
            return f"{CENTRALISED}-{self.local_epochs}epochs"
        base = f"{self.method}-k{self.clients}-{self.split}-e{self.local_epochs}"
        if self.links is None:
            return base
        up, down = self.links
        return f"{base}-{up.replace(':', '')}" + ("" if down == up else
                                                  f"-down-{down.replace(':', '')}")

    @property
    def id(self) -> str:
        return f"{self.configuration}-r{self.repeat}"

    @property
    def label(self) -> str:
        """The method column of the result tables."""
        return CENTRALISED if self.centralised else self.method


def shipped_grids() -> dict[str, Path]:
    """Grid files shipped in the package, by name (file name without .toml)."""
    folder = resources.files(GRID_PACKAGE)
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir()
            if p.name.endswith(".toml")}


def resolve_grid_path(grid: str) -> Path:
    """A grid file path, or the name of a shipped grid (``cpu-small``, ``paper-fmnist``)."""
    path = Path(grid).expanduser()
    if path.is_file():
        return path
    shipped = shipped_grids()
    if grid in shipped:
        return shipped[grid]
    raise UserError(f"No grid file {grid!r}; give the path of a TOML file or one of the shipped "
                    f"grids: {', '.join(sorted(shipped))}.")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the file"
    return f"{where}: {err['msg']}"


def parse_grid(text: str, source: str = "grid") -> GridSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source} is not valid TOML ({exc}); fix the file.") from None
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source} has an invalid setting ({_first_error(exc)}); fix the "
                        "file.") from None
    known = {f.name for f in fields(SimulationConfig)}
    settable = ", ".join(sorted(known - set(VARIED)))
    fixed = spec.centralised_epochs
    if fixed is not None and min([fixed] if isinstance(fixed, int) else fixed or [0]) < 1:
        raise UserError(f"{source}: centralised_epochs must be a number of epochs (at least "
                        "1) or a list of them.")
    for key in spec.simulation:
        if key in VARIED:
            raise UserError(f"{source}: [simulation] may not set {key!r}; the grid varies it "
                            "(use [[sweep]], repeats and seed).")
        if key not in known:
            raise UserError(f"{source}: [simulation] has an unknown setting {key!r}; use one "
                            f"of: {settable}.")
    return spec


def load_grid(grid: str) -> tuple[GridSpec, str, Path]:
    """Read and validate a grid by path or shipped name. Returns (spec, text, path)."""
    path = resolve_grid_path(grid)
    text = path.read_text(encoding="utf-8")
    return parse_grid(text, str(path)), text, path


def _centralised_cells(spec: GridSpec, epochs_of_groups: list[int], rounds: int, repeat: int,
                       seed: int) -> list[Cell]:
    fixed = spec.centralised_epochs
    targets: list[tuple[int, int]]  # (epochs, group E or 0 for a fixed baseline)
    if fixed is None:
        targets = [(rounds * e, e) for e in epochs_of_groups]
    else:
        targets = [(n, 0) for n in ([fixed] if isinstance(fixed, int) else fixed)]
    cells = []
    for epochs, group in targets:
        if spec.centralised_mode == "rounds":
            cell = Cell("full", 1, "iid", 1, epochs, repeat, seed, centralised=True,
                        group_epochs=group)
        else:
            cell = Cell("full", 1, "iid", epochs, 1, repeat, seed, centralised=True,
                        group_epochs=group)
        if cell not in cells:
            cells.append(cell)
    return cells


def grid_cells(spec: GridSpec) -> list[Cell]:
    """Every cell, in run order: per repeat, the baselines first, then the sweeps."""
    rounds = int(spec.simulation.get("rounds", SimulationConfig.rounds))
    combos: dict[tuple[str, int, str, int, str], int] = {}  # configuration -> repeats
    for sweep in spec.sweep:
        repeats = sweep.repeats or spec.repeats
        for e in sweep.local_epochs:
            for split in sweep.splits:
                for k in sweep.clients:
                    for method in sweep.methods:
                        for codecs in sweep.codecs:
                            key = (method, k, split, e, _canonical_codecs(codecs))
                            combos[key] = max(combos.get(key, 0), repeats)
    group_epochs = list(dict.fromkeys(c[3] for c in combos))
    cells: list[Cell] = []
    for r in range(max([spec.repeats, *combos.values()])):
        seed = spec.seed + r
        if spec.centralised and r < spec.repeats:
            cells += _centralised_cells(spec, group_epochs, rounds, r, seed)
        cells += [Cell(m, k, s, e, rounds, r, seed, group_epochs=e, codecs=c)
                  for (m, k, s, e, c), n in combos.items() if r < n]
    return cells


def _canonical_codecs(text: str) -> str:
    """"" or "UPLINK/DOWNLINK" with canonical codec names (UserError on an unknown one)."""
    if not text:
        return ""
    up, _, down = text.partition("/")
    links = LinkCodecs.parse(up, down or up)
    return f"{links.uplink.name}/{links.downlink.name}"


def repeat_counts(cells: list[Cell]) -> dict[str, int]:
    """How many repeats each configuration of the grid runs, in run order."""
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.configuration] = counts.get(cell.configuration, 0) + 1
    return counts


def with_overrides(spec: GridSpec, **settings: Any) -> GridSpec:
    """`spec` with [simulation] settings from the command line (None: keep the grid's)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if not given:
        return spec
    return spec.model_copy(update={"simulation": {**spec.simulation, **given}})


def cell_config(spec: GridSpec, cell: Cell, out: Path) -> SimulationConfig:
    settings = {**spec.simulation, "method": cell.method, "clients": cell.clients,
                "split": cell.split, "local_epochs": cell.local_epochs, "rounds": cell.rounds,
                "seed": cell.seed, "out": str(out / "cells" / cell.id)}
    if cell.links is not None:
        settings["uplink_codec"], settings["downlink_codec"] = cell.links
    try:
        config = SimulationConfig(**settings)
    except TypeError as exc:
        raise UserError(f"grid {spec.name}: {exc}; fix [simulation].") from None
    config.validate()
    return config


def _comparable(config: dict) -> dict:
    # Settings left unset (None) compare equal to settings a report written before they
    # existed does not name.
    return {k: v for k, v in config.items() if k != "out" and v is not None}


def finished_report(config: SimulationConfig) -> dict | None:
    """The cell's report if it finished with exactly this configuration, else None.

    A finished cell run with other settings is an error: results must not mix settings.
    """
    path = Path(config.out) / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged report: the cell runs again
    if _comparable(report.get("config", {})) != _comparable(asdict(config)):
        raise UserError(f"{path.parent} was run with other settings; delete that folder or "
                        "choose another --out to run this grid.")
    return report


@dataclass
class CellOutcome:
    cell: Cell
    config: SimulationConfig
    report: dict
    ran: bool  # False: it was already finished
    seconds: float


def run_cell(config: SimulationConfig, threads: int | None = None,
             echo: Log | None = None) -> tuple[dict, float]:
    """Run one cell, its log into ``log.txt`` (and to `echo`). Returns (report, seconds).

    Module-level so that worker processes of ``jobs > 1`` can run it.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    cell_dir = Path(config.out)
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(cell_dir / "log.txt", "w", encoding="utf-8") as cell_log:

        def both(message: str) -> None:
            cell_log.write(message + "\n")
            cell_log.flush()
            if echo is not None:
                echo("    " + message)

        report = run_simulation(config, log=both)
    return report, time.perf_counter() - started


def run_grid(spec: GridSpec, out: str | Path, grid_text: str = "", log: Log = print,
             quiet_cells: bool = False, jobs: int = 1,
             threads: int | None = None) -> list[CellOutcome]:
    """Run every unfinished cell of `spec` under `out`; returns every cell's outcome.

    With ``jobs > 1`` that many cells run at once in worker processes, each with `threads`
    torch threads (default: the CPU count divided by `jobs`). On a small shared machine,
    single-threaded cells side by side waste no time in thread synchronisation.
    """
    if jobs < 1:
        raise UserError("--jobs must be at least 1.")
    out = Path(out)
    cells = grid_cells(spec)
    configs = [cell_config(spec, c, out) for c in cells]  # validate all before running any
    finished = [finished_report(c) for c in configs]  # and find clashes before running any
    out.mkdir(parents=True, exist_ok=True)
    if grid_text:
        atomic_write_bytes(out / "grid.toml", grid_text.encode())
    outcomes: list[CellOutcome | None] = [None] * len(cells)
    todo = []
    for i, (cell, config, report) in enumerate(zip(cells, configs, finished, strict=True)):
        if report is not None:
            log(f"[{i + 1}/{len(cells)}] {cell.id}: finished earlier, skipped")
            outcomes[i] = CellOutcome(cell, config, report, False, 0.0)
        else:
            todo.append(i)
    started = time.perf_counter()

    def done(i: int, report: dict, seconds: float) -> None:
        outcomes[i] = CellOutcome(cells[i], configs[i], report, True, seconds)
        log(f"[{i + 1}/{len(cells)}] {cells[i].id}: done in {seconds:.0f} s "
            f"({time.perf_counter() - started:.0f} s into this run)")

    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            log(f"[{i + 1}/{len(cells)}] {cells[i].id}: running")
            done(i, *run_cell(configs[i], threads, None if quiet_cells else log))
    else:
        per_job = threads or max(1, (os.cpu_count() or 1) // jobs)
        log(f"{len(todo)} cell(s) to run, {jobs} at a time with {per_job} thread(s) each "
            "(each cell's log is in its log.txt)")
        context = multiprocessing.get_context("spawn")  # never fork a process running torch
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(run_cell, configs[i], per_job): i for i in todo}
            try:
                for future in as_completed(futures):
                    done(futures[future], *future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [o for o in outcomes if o is not None]
