"""PNG figures of an experiment grid (matplotlib, no display needed)."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from .experiment import CENTRALISED, CellOutcome, GridSpec  # noqa: E402
from .experiment_report import reference_rows  # noqa: E402
from .wire import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _methods(spec: GridSpec) -> list[str]:
    return list(dict.fromkeys(m for s in spec.sweep for m in s.methods))


def metric_vs_clients(spec: GridSpec, rows: list[dict], metric: str, epochs: int,
                      path: Path) -> Path | None:
    fed = [r for r in rows if r["method"] != CENTRALISED and r["local_epochs"] == epochs
           and r[metric] is not None]
    if not fed:
        return None
    from .experiment_report import _baselines

    centralised = [r for r in rows if r["method"] == CENTRALISED]
    _, denominator = _baselines(centralised, epochs, fed[0]["rounds"])
    base = [r[metric] for r in centralised if r["epochs"] == denominator
            and r["group_epochs"] in (epochs, 0) and r[metric] is not None]
    splits = list(dict.fromkeys(r["split"] for r in fed))
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.6), squeeze=False,
                             sharey=True)
    for ax, split in zip(axes[0], splits, strict=True):
        for method in _methods(spec):
            ks = sorted({r["clients"] for r in fed if r["method"] == method
                         and r["split"] == split})
            if not ks:
                continue
            stats = [_mean_std([r[metric] for r in fed if (r["method"], r["split"],
                                r["clients"]) == (method, split, k)]) for k in ks]
            ax.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                        capsize=3, label=method)
        if base:
            mean, std = _mean_std(base)
            ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=CENTRALISED)
            ax.errorbar([1], [mean], yerr=[std], color="black", marker="*", markersize=10)
        floors = [r[f"{metric}_real_vs_real"] for r in fed
                  if r["split"] == split and r[f"{metric}_real_vs_real"] is not None]
        if floors:
            ax.axhline(statistics.fmean(floors), color="grey", linestyle=":", linewidth=1,
                       label="real vs real")
        ax.set_title(split)
        ax.set_xlabel("clients K")
        ax.set_xticks(sorted({1, *(r["clients"] for r in fed)}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (lower is better)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{metric} vs number of clients, E = {epochs}")
    return _save(fig, path)


def communication(spec: GridSpec, outcomes: Sequence[CellOutcome], clients: int,
                  path: Path) -> Path | None:
    """Cumulative parameters and bytes per round per method (the paper's figure 4)."""
    chosen: dict[str, CellOutcome] = {}
    for o in outcomes:
        if not o.cell.centralised and o.cell.clients == clients and o.cell.label not in chosen:
            chosen[o.cell.label] = o
    if not chosen:
        return None
    fig, (ax_p, ax_b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in _methods(spec):
        if method not in chosen:
            continue
        rounds = chosen[method].report["rounds"]
        xs = [r["round"] for r in rounds]
        ax_p.plot(xs, [r["cumulative_params"] / 1e6 for r in rounds], marker="o", label=method)
        ax_b.plot(xs, [r["cumulative_bytes"] / 1e6 for r in rounds], marker="o", label=method)
    ax_p.set_ylabel("cumulative parameters (millions)")
    ax_b.set_ylabel("cumulative bytes (MB)")
    for ax in (ax_p, ax_b):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_p.legend(fontsize=8)
    fig.suptitle(f"Communication per round, K = {clients} (all clients, both directions)")
    return _save(fig, path)


def sample_grids(spec: GridSpec, outcomes: Sequence[CellOutcome], path: Path) -> Path | None:
    """One sample grid per method at the largest K of the first split (the paper's figure 5)."""
    fed = [o for o in outcomes if not o.cell.centralised]
    if not fed:
        return None
    k = max(o.cell.clients for o in fed)
    split = fed[0].cell.split
    panels: dict[str, Path] = {}
    for o in outcomes:
        if o.cell.repeat != 0 or (not o.cell.centralised and
                                  (o.cell.clients, o.cell.split) != (k, split)):
            continue
        sample_path = (o.report.get("files") or {}).get("samples")
        if sample_path and Path(sample_path).is_file() and o.cell.label not in panels:
            panels[o.cell.label] = Path(sample_path)
    order = [m for m in [*_methods(spec), CENTRALISED] if m in panels]
    if not order:
        return None
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.6), squeeze=False)
    for ax, label in zip(axes[0], order, strict=True):
        with Image.open(panels[label]) as image:
            if image.mode == "L":
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image.convert("RGB"))
        ax.set_title(label if label == CENTRALISED else f"{label} (K = {k}, {split})",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle("Samples per method (personal-model methods: one row per client)")
    return _save(fig, path)


def metric_curves(spec: GridSpec, curves: list[dict], metric: str, key: tuple[int, str, int],
                  path: Path) -> Path | None:
    """Metric vs round and metric vs cumulative bytes, one line per method (mean over
    repeats), for the cells of one (K, split, E): the traffic-quality frontier."""
    k, split, e = key
    chosen = [c for c in curves if (c["clients"], c["split"], c["local_epochs"]) == key
              and c[metric] is not None]
    if not chosen:
        return None
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for method in [*_methods(spec), CENTRALISED]:
        points = [c for c in chosen if c["method"] == method]
        if not points:
            continue
        rounds = sorted({c["round"] for c in points})
        values = [statistics.fmean(c[metric] for c in points if c["round"] == r)
                  for r in rounds]
        traffic = [statistics.fmean(c["cumulative_bytes"] for c in points if c["round"] == r)
                   / 1e6 for r in rounds]
        ax_r.plot(rounds, values, marker="o", label=method)
        ax_b.plot(traffic, values, marker="o", label=method)
    ax_r.set_xlabel("round")
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_b.set_xlabel("cumulative bytes exchanged (MB, all clients)")
    ax_r.set_ylabel(f"{metric} (lower is better)")
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    fig.suptitle(f"{metric} over training, K = {k}, {split}, E = {e}")
    return _save(fig, path)


def codec_frontier(rows: list[dict], metric: str, path: Path) -> Path | None:
    """The metric of every federated cell against its total bytes (log axis), one colour per
    method, each point labelled with its codecs; None without a codec sweep."""
    fed = [r for r in rows if r["method"] != CENTRALISED and r[metric] is not None]
    if len({r["codecs"] for r in fed}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = dict.fromkeys((r["method"], r["clients"], r["split"]) for r in fed)
    for method, k, split in groups:
        group = sorted((r for r in fed if (r["method"], r["clients"], r["split"])
                        == (method, k, split)), key=lambda r: r["total_bytes"])
        xs = [r["total_bytes"] for r in group]
        ax.plot(xs, [r[metric] for r in group], marker="o", linestyle=":",
                label=f"{method}, K = {k}, {split}")
        for r in group:
            ax.annotate(r["codecs"].replace("/fp32", "").replace("fp32/", "up fp32, "),
                        (r["total_bytes"], r[metric]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total bytes, all clients, both directions (log)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Codec frontier: {metric} against bytes")
    return _save(fig, path)


def write_plots(spec: GridSpec, outcomes: Sequence[CellOutcome], rows: list[dict],
                metrics: list[str], out: Path, curves: list[dict] | None = None) -> list[Path]:
    written: list[Path | None] = [codec_frontier(rows, m, out / f"{m}-vs-bytes.png")
                                  for m in metrics]
    rows = reference_rows(rows)
    kept = {r["cell"] for r in rows}
    outcomes = [o for o in outcomes if o.cell.id in kept]
    epochs = list(dict.fromkeys(r["local_epochs"] for r in rows if r["method"] != CENTRALISED))
    for metric in metrics:
        for e in epochs:
            suffix = "" if len(epochs) == 1 else f"-e{e}"
            written.append(metric_vs_clients(spec, rows, metric, e,
                                             out / f"{metric}-vs-clients{suffix}.png"))
    for k in sorted({o.cell.clients for o in outcomes if not o.cell.centralised}):
        written.append(communication(spec, outcomes, k, out / f"communication-k{k}.png"))
    written.append(sample_grids(spec, outcomes, out / "samples-per-method.png"))
    curves = [c for c in curves or [] if c["method"] != CENTRALISED]
    for metric in metrics:
        for key in dict.fromkeys((c["clients"], c["split"], c["local_epochs"]) for c in curves):
            written.append(metric_curves(spec, curves, metric, key, out / (
                f"{metric}-curve-k{key[0]}-{key[1]}-e{key[2]}.png")))
    return [p for p in written if p is not None]
