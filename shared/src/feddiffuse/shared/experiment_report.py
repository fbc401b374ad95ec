"""Tables and figures of a finished experiment grid.

- ``results.csv``: one row per cell: each metric's headline (a global model's value; for
  personal-model methods the mean over clients, each client scored on its own samples, as
  the authors averaged), the standard deviation over clients, the pooled set's value, the
  best and worst client, the floors, communication and timings; ``per_client.csv``: one row
  per client of every personal-model cell; ``curves.csv``: the metric after every
  ``eval_every`` rounds, with the cumulative traffic.
- ``results.md``: per metric and local-epoch value, mean ± std over repeats in the paper's
  table shape (rows "K, split", one column per method, the centralised baselines beside
  them), the ratio to the centralised baseline, the personal models' mean over clients with
  the pooled figure beside it, and the communication totals.
- PNG plots: metric vs number of clients per method; cumulative communication per round per
  method, in parameters and in bytes (the paper's figure 4); one sample grid per method
  (figure 5); with curves, metric vs round and metric vs cumulative bytes.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from .evaluation import format_value, parse_metrics
from .experiment import CENTRALISED, CellOutcome, GridSpec
from .wire import atomic_write_bytes


def _metric_names(outcomes: Sequence[CellOutcome]) -> list[str]:
    names: list[str] = []
    for o in outcomes:
        evaluation = o.report.get("evaluation") or {}
        if evaluation:
            for name in parse_metrics(o.config.eval_metrics):
                if name not in names:
                    names.append(name)
    return names


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _value(report: dict, metric: str, key: str = "value") -> float | None:
    """The pooled (or only) set's `key` of `metric`."""
    entry = ((report.get("evaluation") or {}).get("metrics") or {}).get(metric) or {}
    return _number(entry.get(key))


def _personal(report: dict) -> bool:
    return (report.get("evaluation") or {}).get("models") == "personal"


def headline(report: dict, metric: str) -> float | None:
    """The cell's figure: the one model's value, or the mean over its clients' own values
    (reports written before the mean was recorded: computed from their per-client values)."""
    evaluation = report.get("evaluation") or {}
    if not _personal(report):
        return _value(report, metric)
    if "headline" in evaluation:
        return _number(evaluation["headline"].get(metric))
    values = _client_values(report, metric)
    return statistics.fmean(values) if values else None


def _client_values(report: dict, metric: str) -> list[float]:
    per_client = (report.get("evaluation") or {}).get("per_client") or {}
    values = []
    for entry in per_client.values():
        v = (entry.get("metrics") or {}).get(metric, {}).get("value")
        if isinstance(v, int | float):
            values.append(float(v))
    return values


def result_rows(outcomes: Sequence[CellOutcome]) -> tuple[list[dict], list[str]]:
    metrics = _metric_names(outcomes)
    rows = []
    for o in outcomes:
        c, r = o.cell, o.report
        config = r.get("config") or {}  # a report written before codecs: fp32 both ways
        totals = r["ledger"]["totals"]
        row = {"cell": c.id, "method": c.label, "clients": c.clients, "split": c.split,
               "local_epochs": c.local_epochs, "rounds": c.rounds, "group_epochs": c.group_epochs,
               "epochs": c.epochs, "repeat": c.repeat, "seed": c.seed,
               "protocol": (r.get("protocol") or {}).get("protocol", "product"),
               "images": r["dataset"]["images"],
               "eval_samples": (r.get("evaluation") or {}).get("samples"),
               "codecs": (f"{config.get('uplink_codec', 'fp32')}/"
                          f"{config.get('downlink_codec', 'fp32')}")}
        row["headline"] = "mean over clients" if _personal(r) else "one model"
        for m in metrics:
            row[m] = headline(r, m)
            clients = _client_values(r, m)
            row[f"{m}_clients_std"] = (statistics.stdev(clients) if len(clients) > 1
                                       else None)
            row[f"{m}_pooled"] = _value(r, m) if _personal(r) else None
            row[f"{m}_real_vs_real"] = _value(r, m, "real_vs_real")
            row[f"{m}_best_client"] = min(clients) if clients else None
            row[f"{m}_worst_client"] = max(clients) if clients else None
        row.update({"total_params": totals["total_params"], "total_bytes": totals["total_bytes"],
                    "seconds": round(float(r["seconds"]), 1)})
        rows.append(row)
    return rows, metrics


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue().encode()


def per_client_rows(outcomes: Sequence[CellOutcome], metrics: list[str]) -> list[dict]:
    rows = []
    for o in outcomes:
        evaluation = o.report.get("evaluation") or {}
        sizes = o.report["dataset"]["client_sizes"]
        for client, entry in (evaluation.get("per_client") or {}).items():
            row = {"cell": o.cell.id, "method": o.cell.label, "clients": o.cell.clients,
                   "split": o.cell.split, "repeat": o.cell.repeat, "client": client,
                   "train_images": sizes.get(client), "eval_samples": entry.get("samples")}
            for m in metrics:
                row[m] = (entry.get("metrics") or {}).get(m, {}).get("value")
            rows.append(row)
    return rows


def curve_rows(outcomes: Sequence[CellOutcome], metrics: list[str]) -> list[dict]:
    """One row per evaluated round of every cell that kept a metric curve."""
    rows = []
    for o in outcomes:
        for point in o.report.get("curve") or []:
            row = {"cell": o.cell.id, "method": o.cell.label, "clients": o.cell.clients,
                   "split": o.cell.split, "local_epochs": o.cell.local_epochs,
                   "repeat": o.cell.repeat, "round": point["round"],
                   "cumulative_params": point["cumulative_params"],
                   "cumulative_bytes": point["cumulative_bytes"]}
            for m in metrics:
                row[m] = _number((point.get("headline") or {}).get(m))
            rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float | None] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(stats: tuple[float, float | None] | None) -> str:
    """"mean ± std", the std with as many decimals as the mean; no spread: the mean alone."""
    if stats is None:
        return "n/a"
    mean, std = stats
    shown = format_value(mean)
    if std is None or std == 0:
        return shown
    decimals = len(shown.split(".")[1]) if "." in shown and "e" not in shown else 2
    return f"{shown} ± {std:.{decimals}f}"


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _baselines(base: list[dict], e: int, rounds: int) -> tuple[list[int], int | None]:
    """The baselines beside the E = e table, as their total epochs, and the one the ratios
    divide by: the one of this E, else the one of R epochs (the paper's), else the longest."""
    own = [r for r in base if r["group_epochs"] == e]
    chosen = own or [r for r in base if r["group_epochs"] == 0]
    epochs = sorted({r["epochs"] for r in chosen})
    if not epochs:
        return [], None
    if own:
        return epochs, epochs[-1]
    return epochs, (rounds if rounds in epochs else epochs[-1])


def reference_rows(rows: list[dict]) -> list[dict]:
    """The rows the per-method tables and plots compare: the baselines, and the federated
    cells in the first codec pair of the grid (all of them when it sweeps no codecs)."""
    fed = [r for r in rows if r["method"] != CENTRALISED]
    first = fed[0]["codecs"] if fed else None
    return [r for r in rows if r["method"] == CENTRALISED or r["codecs"] == first]


def codec_frontier(rows: list[dict], metrics: list[str]) -> list[str]:
    """The codec table: every federated cell's bytes against the same method, K and split in
    fp32 both ways (when the grid has it), and its metrics. Empty without a codec sweep."""
    fed = [r for r in rows if r["method"] != CENTRALISED]
    if len({r["codecs"] for r in fed}) < 2:
        return []
    fp32 = {}
    for r in fed:
        if r["codecs"] == "fp32/fp32":
            fp32.setdefault((r["method"], r["clients"], r["split"], r["local_epochs"]),
                            r["total_bytes"])
    lines = ["## Codec frontier (whole run, all clients)", "",
             "| method | K, split | uplink/downlink | MB | x fp32 | " + " | ".join(metrics)
             + " |", "|" + "---|" * (5 + len(metrics))]
    for r in sorted(fed, key=lambda r: (r["method"], r["clients"], r["split"],
                                        -r["total_bytes"])):
        base = fp32.get((r["method"], r["clients"], r["split"], r["local_epochs"]))
        ratio = f"{r['total_bytes'] / base:.3f}" if base else ""
        lines.append(f"| {r['method']} | {r['clients']}, {r['split']} | {r['codecs']} | "
                     f"{r['total_bytes'] / 1e6:.2f} | {ratio} | "
                     + " | ".join(format_value(r[m]) for m in metrics) + " |")
    return [*lines, ""]


def markdown(spec: GridSpec, rows: list[dict], metrics: list[str]) -> str:
    frontier = codec_frontier(rows, metrics)
    rows = reference_rows(rows)
    fed = [r for r in rows if r["method"] != CENTRALISED]
    base = [r for r in rows if r["method"] == CENTRALISED]
    methods = _ordered(m for s in spec.sweep for m in s.methods)
    splits = _ordered(s for sw in spec.sweep for s in sw.splits)
    epochs = _ordered(r["local_epochs"] for r in fed)
    rounds = fed[0]["rounds"] if fed else 0
    repeats = max((r["repeat"] for r in rows), default=0) + 1
    protocols = _ordered(r["protocol"] for r in rows)
    lines = [f"# Experiment grid `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    sim = spec.simulation
    lines += [f"{len(rows)} cells, up to {repeats} repeat(s) per cell (mean ± std over "
              "repeats; a single run shows no spread). Preset "
              f"`{sim.get('preset', 'tiny')}`, dataset `{sim.get('dataset', 'fashion-mnist')}`"
              + (f" ({rows[0]['images']} training images)" if rows else "")
              + f", R = {rounds or '?'} rounds, protocol {', '.join(protocols) or '?'}. "
              "Personal-model methods (udec, ulatdec): the mean over clients, each client "
              "scored on its own samples (see the pooled figures below).", ""]
    for metric in metrics:
        for e in epochs:
            group = [r for r in fed if r["local_epochs"] == e]
            b_epochs, denominator = _baselines(base, e, rounds)
            baseline = [r for r in base if r["epochs"] in b_epochs
                        and r["group_epochs"] in (e, 0)]
            b_stats = {n: _mean_std([r[metric] for r in baseline if r["epochs"] == n])
                       for n in b_epochs}
            floor = _mean_std([r[f"{metric}_real_vs_real"] for r in group + baseline])
            samples = _ordered(r["eval_samples"] for r in group + baseline)
            lines += [f"## {metric}, E = {e} (lower is better)", "",
                      f"Samples per evaluated model: {', '.join(map(str, samples))}; "
                      f"real-vs-real floor {_fmt(floor)}; centralised baseline: one client, "
                      f"{', '.join(map(str, b_epochs)) or 'no'} epoch(s).", ""]
            b_header = [f"centralised ({n} epochs)" if len(b_epochs) > 1 else "centralised"
                        for n in b_epochs]
            header = ["K, split", *methods, *b_header]
            ratio_lines = []
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            keys = _ordered((r["clients"], r["split"]) for r in sorted(
                group, key=lambda r: (splits.index(r["split"]), r["clients"])))
            denom = b_stats.get(denominator) if denominator is not None else None
            for k, split in keys:
                cells = []
                ratios = []
                for m in methods:
                    vals = [r[metric] for r in group
                            if (r["method"], r["clients"], r["split"]) == (m, k, split)]
                    stats = _mean_std(vals)
                    cells.append(_fmt(stats) if vals else "")
                    ratios.append("" if stats is None or not denom or not denom[0]
                                  else f"{stats[0] / denom[0]:.2f}")
                row_cells = [f"{k}, {split}", *cells, *(_fmt(b_stats[n]) for n in b_epochs)]
                lines.append("| " + " | ".join(row_cells) + " |")
                ratio_lines.append("| " + " | ".join([f"{k}, {split}", *ratios]) + " |")
            if denom:
                lines += ["", f"Ratio to the centralised baseline of {denominator} epochs "
                          f"({metric}, E = {e}; the paper compares ratios):", "",
                          "| " + " | ".join(["K, split", *methods]) + " |",
                          "|" + "---|" * (len(methods) + 1), *ratio_lines]
            spread = [r for r in group if r[f"{metric}_worst_client"] is not None]
            if spread:
                lines += ["", f"Personal models ({metric}): the mean ± std over clients (each "
                          "client's own samples; the table's figure), the pooled set of all "
                          "clients' samples (larger, so less small-sample bias: not "
                          "comparable with a global model's figure), and the best and worst "
                          "client; see per_client.csv.", "",
                          "| cell | mean over clients | pooled | best | worst |",
                          "|---|---|---|---|---|"]
                for r in spread:
                    mean = (r[metric], r[f"{metric}_clients_std"]) \
                        if r[metric] is not None else None
                    lines.append(f"| {r['cell']} | {_fmt(mean)} "
                                 f"| {format_value(r[f'{metric}_pooled'])} "
                                 f"| {format_value(r[f'{metric}_best_client'])} "
                                 f"| {format_value(r[f'{metric}_worst_client'])} |")
            lines.append("")
    lines += ["## Communication (whole run, all clients)", "",
              "| method | K | parameters | MB |", "|---|---|---|---|"]
    seen = set()
    for r in fed:
        key = (r["method"], r["clients"])
        if key in seen or r["repeat"] != 0:
            continue
        seen.add(key)
        lines.append(f"| {r['method']} | {r['clients']} | {r['total_params']:,} | "
                     f"{r['total_bytes'] / 1e6:.1f} |")
    lines.append("")
    lines += frontier
    return "\n".join(lines)


def write_report(spec: GridSpec, outcomes: Sequence[CellOutcome], out: str | Path,
                 plots: bool = True) -> list[Path]:
    """Write results.csv, per_client.csv, results.md and (optionally) the plots."""
    out = Path(out)
    rows, metrics = result_rows(outcomes)
    client_rows = per_client_rows(outcomes, metrics)
    curves = curve_rows(outcomes, metrics)
    md = markdown(spec, rows, metrics)
    written = []
    files = [("results.csv", _csv(rows)), ("per_client.csv", _csv(client_rows)),
             ("results.md", md.encode())]
    if curves:
        files.append(("curves.csv", _csv(curves)))
    for name, data in files:
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    if plots:
        from .experiment_plots import write_plots  # local: matplotlib loads in ~1 s

        written += write_plots(spec, outcomes, rows, metrics, out, curves)
    return written
