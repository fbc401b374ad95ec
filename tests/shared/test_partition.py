"""Tests of the client partitions (iid, label-skew, quantity-skew) and the class tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feddiffuse.shared.data import (
    FASHION_MNIST_CLASSES,
    SPLITS,
    client_class_table,
    format_class_table,
    load_fashion_mnist,
    partition_indices,
    quantity_skew_proportions,
)
from feddiffuse.shared.data import partition as partition_module
from feddiffuse.shared.errors import UserError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.requires_fmnist  # skipped without the data, failed in CI

PAPER_QUANTITY_SKEW = [529, 14, 46087, 11898, 1473]


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    """6,000 synthetic labels in 10 balanced classes, in a scrambled order."""
    generator = torch.Generator().manual_seed(7)
    return torch.arange(6000)[torch.randperm(6000, generator=generator)] % 10


@pytest.fixture(scope="module")
def fmnist_labels(fmnist_required_module) -> torch.Tensor:
    return load_fashion_mnist("train", data_dir=REAL_DIR, download=False).labels


def check_partition(parts: list[torch.Tensor], n: int, k: int, min_size: int = 10) -> None:
    assert len(parts) == k
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in parts)
    everything = torch.cat(parts)
    assert len(everything) == n  # no sample twice, none dropped
    assert torch.equal(everything.sort().values, torch.arange(n))
    assert min(len(p) for p in parts) >= min_size


def class_fractions(parts: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(client_class_table(parts, y, 10), dtype=torch.float64)
    return table / table.sum(dim=1, keepdim=True)


def mean_tv_from(parts: list[torch.Tensor], y: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean total-variation distance of the clients' class mixes from ``reference``."""
    return float((class_fractions(parts, y) - reference).abs().sum(dim=1).mean() / 2)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("k", [2, 5, 10])
def test_disjoint_complete_and_min_size(split: str, k: int, labels: torch.Tensor) -> None:
    parts = partition_indices(6000, k, split, labels=labels, seed=11)
    check_partition(parts, 6000, k)


@pytest.mark.parametrize("split", SPLITS)
def test_seed_determinism(split: str, labels: torch.Tensor) -> None:
    a = partition_indices(6000, 5, split, labels=labels, seed=1)
    b = partition_indices(6000, 5, split, labels=labels, seed=1)
    c = partition_indices(6000, 5, split, labels=labels, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("split", SPLITS)
def test_one_client_gets_everything(split: str, labels: torch.Tensor) -> None:
    (only,) = partition_indices(6000, 1, split, labels=labels)
    assert torch.equal(only.sort().values, torch.arange(6000))


def test_iid_is_as_equal_as_possible(labels: torch.Tensor) -> None:
    parts = partition_indices(6003, 4, "iid", labels=None)
    assert sorted(len(p) for p in parts) == [1500, 1501, 1501, 1501]
    balanced = partition_indices(6000, 5, "iid")
    assert mean_tv_from(balanced, labels, torch.full((10,), 0.1, dtype=torch.float64)) < 0.05


def test_quantity_skew_reproduces_the_paper() -> None:
    parts = partition_indices(60000, 5, "quantity-skew", seed=2023)
    # The actual cut at int(cumsum(p) * N) ...
    assert [len(p) for p in parts] == [529, 13, 46087, 11898, 1473]
    check_partition(parts, 60000, 5)
    # ... and the paper's figures, which are round(p * N) (they add up to 60,001).
    proportions = quantity_skew_proportions(60000, 5, beta=0.5, seed=2023)
    assert np.round(proportions * 60000).astype(int).tolist() == PAPER_QUANTITY_SKEW
    assert proportions.sum() == pytest.approx(1.0)


def test_quantity_skew_sizes_skewed_labels_iid(labels: torch.Tensor) -> None:
    parts = partition_indices(6000, 5, "quantity-skew", labels=labels, seed=2023)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0] and sizes[-1] > 1800  # far from 1,200 each
    big = [p for p in parts if len(p) >= 1000]
    assert big
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert mean_tv_from(big, labels, uniform) < 0.06  # labels stay IID


@needs_real
def test_label_skew_on_fashion_mnist_is_skewed(fmnist_labels: torch.Tensor) -> None:
    y = fmnist_labels
    skewed = partition_indices(60000, 5, "label-skew", labels=y, seed=2023)
    check_partition(skewed, 60000, 5)
    iid = partition_indices(60000, 5, "iid", labels=y, seed=2023)
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert mean_tv_from(iid, y, uniform) < 0.02
    assert mean_tv_from(skewed, y, uniform) > 0.3
    # Dirichlet(0.5) shares leave some clients with (almost) none of some classes.
    table = client_class_table(skewed, y, 10)
    assert sum(1 for row in table for count in row if count < 60) >= 5
    # The N/K cap: a client that reached 12,000 samples gets no share of later classes, so
    # nobody ends far above N/K + one class (6,000).
    assert max(len(p) for p in skewed) <= 12000 + 6000


@pytest.mark.parametrize(("k", "seed"), [(3, 0), (5, 1), (10, 2023)])
def test_label_skew_caps_clients_at_n_over_k(k: int, seed: int, labels: torch.Tensor) -> None:
    """Classes are dealt in order 0..9; a client holding N/K or more gets no later class."""
    parts = partition_indices(6000, k, "label-skew", labels=labels, seed=seed)
    capped = 0
    for row in client_class_table(parts, labels, 10):
        held = 0
        for count in row:
            if held >= 6000 / k:
                capped += 1
                assert count == 0
            held += count
    assert capped > 0  # the cap actually came into play


def test_label_skew_small_beta_and_redraws(labels: torch.Tensor) -> None:
    parts = partition_indices(6000, 10, "label-skew", labels=labels, beta=0.1, seed=3)
    check_partition(parts, 6000, 10)
    fractions = class_fractions(parts, labels)
    assert float(fractions.max(dim=1).values.mean()) > 0.4  # dominated by a few classes
    tiny = partition_indices(100, 5, "label-skew", labels=labels[:100], min_size=15, seed=4)
    check_partition(tiny, 100, 5, min_size=15)


def test_quantity_skew_min_size() -> None:
    parts = partition_indices(200, 4, "quantity-skew", min_size=30, seed=9)
    check_partition(parts, 200, 4, min_size=30)


def test_labels_may_be_any_integer_tensor(labels: torch.Tensor) -> None:
    as_int32 = partition_indices(6000, 3, "label-skew", labels=labels.to(torch.int32), seed=5)
    as_int64 = partition_indices(6000, 3, "label-skew", labels=labels, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(as_int32, as_int64, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"split": "dirichlet"}, "iid, label-skew, quantity-skew"),
        ({"num_clients": 0}, "at least 1"),
        ({"num_samples": 3, "num_clients": 5}, "Cannot split 3 samples among 5 clients"),
        ({"beta": 0.0}, "beta must be a positive"),
        ({"beta": -1.0}, "beta must be a positive"),
        ({"beta": float("nan")}, "beta must be a positive"),
        ({"num_samples": 40, "min_size": 10}, "at least 10 samples, so 40 samples are too few"),
        ({"min_size": -1}, "min_size"),
        ({"split": "label-skew", "labels": None}, "needs class labels"),
        ({"split": "label-skew", "labels": torch.zeros(7, dtype=torch.int64)}, "7 labels"),
        ({"split": "label-skew", "labels": torch.full((100,), -1)}, "non-negative"),
    ],
)
def test_errors(kwargs: dict, pattern: str) -> None:
    args = {"num_samples": 100, "num_clients": 5, "split": "quantity-skew"} | kwargs
    with pytest.raises(UserError, match=pattern):
        partition_indices(**args)


def test_hopeless_settings_give_up_with_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition_module, "_MAX_QUANTITY_DRAWS", 50)
    monkeypatch.setattr(partition_module, "_MAX_LABEL_DRAWS", 5)
    with pytest.raises(UserError, match="larger beta"):
        partition_indices(50, 5, "quantity-skew", beta=0.01, min_size=10)
    with pytest.raises(UserError, match="larger beta"):
        partition_indices(50, 5, "label-skew", labels=torch.arange(50) % 10, beta=0.01)


def test_class_table_and_format() -> None:
    y = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    parts = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7])]
    table = client_class_table(parts, y, 3)
    assert table == [[2, 1, 0], [1, 1, 3]]
    assert client_class_table(parts, y, 5)[0] == [2, 1, 0, 0, 0]
    text = format_class_table(table, ["shirt", "bag", "coat"])
    lines = text.splitlines()
    assert lines[0].split() == ["client", "shirt", "bag", "coat", "total"]
    assert lines[2].split() == ["0", "2", "1", "0", "3"]
    assert lines[3].split() == ["1", "1", "1", "3", "5"]
    assert lines[-1].split() == ["total", "3", "2", "3", "8"]
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert format_class_table(table).splitlines()[0].split() == ["client", "0", "1", "2", "total"]
    with pytest.raises(ValueError):
        format_class_table(table, ["too", "few"])
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_iid_needs_only_one_sample_per_client() -> None:
    parts = partition_indices(12, 2, "iid", seed=0)
    assert [len(p) for p in parts] == [6, 6]
