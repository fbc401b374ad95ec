"""Splitting a dataset's indices among federated clients (the paper's three splits).

All three follow the NIID-Bench recipes (Li et al., "Federated Learning on Non-IID Data
Silos: An Experimental Study") driven by one ``numpy.random.RandomState(seed)``, so a seed
gives the same partition on every machine:

``iid`` ("homo")
    A random permutation cut into ``num_clients`` parts as equal as possible.
``label-skew`` ("noniid-labeldir")
    For each class in turn: shuffle that class's indices, draw client shares from
    Dirichlet(beta), zero the share of every client that already holds at least ``N / K``
    samples (and renormalise), and cut the class by the cumulative shares. The whole draw
    is repeated until every client holds at least ``min_size`` samples. Every sample is
    assigned; each client's indices are shuffled at the end.
``quantity-skew`` ("iid-diff-quantity")
    A random permutation of all indices; client proportions from Dirichlet(beta), redrawn
    until every ``proportion * N >= min_size``; the permutation is cut at
    ``int(cumsum(proportions) * N)``. Labels stay IID.

With seed 2023, ``N = 60,000``, ``K = 5`` and ``beta = 0.5`` the quantity-skew proportions
times N round to the paper's 529 / 14 / 46,087 / 11,898 / 1,473 (which add up to 60,001);
the actual cut gives 529 / 13 / 46,087 / 11,898 / 1,473.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from feddiffuse.shared.data.fashion_mnist import FASHION_MNIST_CLASSES
from feddiffuse.shared.errors import UserError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SPLITS",
    "client_class_table",
    "format_class_table",
    "partition_indices",
    "quantity_skew_proportions",
]

SPLITS: tuple[str, ...] = ("iid", "label-skew", "quantity-skew")

# Redraw caps: the defaults need a handful of draws; these only stop hopeless settings.
_MAX_QUANTITY_DRAWS = 100_000
_MAX_LABEL_DRAWS = 1_000


def _validate(num_samples: int, num_clients: int, split: str, beta: float, min_size: int) -> None:
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if num_clients < 1:
        raise UserError(f"The number of clients must be at least 1, not {num_clients}.")
    if num_samples < num_clients:
        raise UserError(
            f"Cannot split {num_samples} samples among {num_clients} clients; "
            "use fewer clients or more data."
        )
    if not beta > 0 or math.isinf(beta):
        raise UserError(f"beta must be a positive number, not {beta}; the paper uses 0.5.")
    if min_size < 0:
        raise UserError(f"min_size must be 0 or more, not {min_size}.")
    if split != "iid" and min_size * num_clients > num_samples:
        raise UserError(
            f"The {split} split gives every client at least {min_size} samples, so "
            f"{num_samples} samples are too few for {num_clients} clients; use fewer clients, "
            "more data or the iid split."
        )


def _dirichlet(rng: np.random.RandomState, beta: float, k: int) -> np.ndarray | None:
    """One Dirichlet(beta, ..., beta) draw, or None when it degenerates (tiny beta)."""
    p = rng.dirichlet(np.repeat(beta, k))
    total = p.sum()
    if not np.all(np.isfinite(p)) or total <= 0:
        return None
    return p / total


def _cut(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
    return np.split(indices, cuts)


def quantity_skew_proportions(
    num_samples: int, num_clients: int, beta: float = 0.5, seed: int = 2023, min_size: int = 10
) -> np.ndarray:
    """The client proportions quantity-skew uses (after the permutation it draws first)."""
    _validate(num_samples, num_clients, "quantity-skew", beta, min_size)
    rng = np.random.RandomState(seed)
    return _quantity_proportions(rng, num_samples, num_clients, beta, min_size)[1]


def _quantity_proportions(
    rng: np.random.RandomState, n: int, k: int, beta: float, min_size: int
) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    for _ in range(_MAX_QUANTITY_DRAWS):
        p = _dirichlet(rng, beta, k)
        if p is not None and np.min(p * n) >= min_size:
            return order, p
    raise UserError(
        f"Could not draw quantity-skew sizes with at least {min_size} samples for each of {k} "
        f"clients (beta {beta}); use a larger beta, fewer clients or a smaller min_size."
    )


def _label_skew(
    rng: np.random.RandomState, labels: np.ndarray, k: int, beta: float, min_size: int
) -> list[np.ndarray]:
    n = len(labels)
    num_classes = int(labels.max()) + 1
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(_MAX_LABEL_DRAWS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for members in by_class:
            members = members.copy()
            rng.shuffle(members)
            p = rng.dirichlet(np.repeat(beta, k))
            open_clients = sizes < n / k
            p = np.where(open_clients, p, 0.0)
            total = p.sum()
            if not np.isfinite(total) or total <= 0:
                # Every open client drew a zero share (possible with tiny beta): share equally.
                p, total = open_clients.astype(np.float64), float(open_clients.sum())
            for j, part in enumerate(_cut(members, p / total)):
                chunks[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_size:
            parts = [np.concatenate(c) if c else np.empty(0, dtype=np.int64) for c in chunks]
            for part in parts:
                rng.shuffle(part)
            return parts
    raise UserError(
        f"Could not draw a label-skew split with at least {min_size} samples for each of {k} "
        f"clients (beta {beta}); use a larger beta, fewer clients or a smaller min_size."
    )


def partition_indices(
    num_samples: int,
    num_clients: int,
    split: str,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    seed: int = 2023,
    min_size: int = 10,
) -> list[torch.Tensor]:
    """Split ``range(num_samples)`` into ``num_clients`` disjoint int64 index tensors.

    Every sample is assigned to exactly one client. The skewed splits give every client at
    least ``min_size`` samples (redrawing as the paper does); ``iid`` splits as equally as
    possible and only needs one sample per client. ``label-skew`` needs ``labels``
    (``num_samples`` non-negative integers); ``beta`` is the Dirichlet concentration of the
    two skewed splits (smaller is more skewed). See the module docstring for the recipes.
    """
    _validate(num_samples, num_clients, split, beta, min_size)
    rng = np.random.RandomState(seed)
    if split == "iid":
        parts = np.array_split(rng.permutation(num_samples), num_clients)
    elif split == "quantity-skew":
        order, p = _quantity_proportions(rng, num_samples, num_clients, beta, min_size)
        parts = _cut(order, p)
    else:
        if labels is None:
            raise UserError(
                "The label-skew split needs class labels; use a labelled dataset "
                "(Fashion-MNIST or CelebA) or the iid / quantity-skew split."
            )
        y = torch.as_tensor(labels).detach().cpu().flatten().numpy()
        if len(y) != num_samples:
            raise UserError(
                f"Got {len(y)} labels for {num_samples} samples; pass one label per sample."
            )
        if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
            raise UserError("Labels must be non-negative integers; pass class indices.")
        parts = _label_skew(rng, y.astype(np.int64), num_clients, beta, min_size)
    return [torch.from_numpy(np.ascontiguousarray(p, dtype=np.int64)) for p in parts]


def client_class_table(
    parts: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int
) -> list[list[int]]:
    """Sample counts per client (rows) and class (columns)."""
    y = torch.as_tensor(labels).to(torch.int64)
    return [
        torch.bincount(y[torch.as_tensor(p, dtype=torch.int64)], minlength=num_classes).tolist()[
            :num_classes
        ]
        for p in parts
    ]


def format_class_table(
    table: Sequence[Sequence[int]], class_names: Sequence[str] | None = None
) -> str:
    """A right-aligned text table of :func:`client_class_table` with row and column totals."""
    num_classes = len(table[0]) if table else len(class_names or ())
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} columns")
    header = ["client", *names, "total"]
    rows = [[str(i), *(str(v) for v in row), str(sum(row))] for i, row in enumerate(table)]
    column_totals = [sum(row[c] for row in table) for c in range(num_classes)]
    rows.append(["total", *(str(v) for v in column_totals), str(sum(column_totals))])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])
