"""Fixtures of the edge client tests: synthetic image folders, a fake hub, quick backoff."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from edge_fakehub import FakeHub  # the helper modules beside this file (pytest pythonpath)
from edge_images import make_images

from feddiffuse.edge_client.backoff import Backoff


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread: these tests train a few steps at a time on a machine shared with others,
    where two OpenMP threads per process wait for each other far more than they help."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    return make_images(tmp_path / "images")


@pytest.fixture
def quick_backoff() -> Backoff:
    return Backoff(initial=0.01, maximum=0.05, jitter=0.5)


@pytest.fixture
def fake_hub() -> FakeHub:
    return FakeHub(method="full", clients=("client-a", "client-b"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
