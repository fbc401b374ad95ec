"""Shared test configuration: keep torch to the machine's cores and the suite hermetic."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

def fashion_mnist_available() -> bool:
    from feddiffuse.shared.data.install import found

    return found() is not None


def check_fashion_mnist_installed() -> None:
    """Tests that need the real data fail without it (`make test` fetches it first): a
    skipped test would hide what it checks."""
    if not fashion_mnist_available():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (feddiffuse fetch-data), "
                    "or apt-get install dataset-fashion-mnist")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_fmnist: needs the real Fashion-MNIST files (fails without them)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_fmnist") is not None:
        check_fashion_mnist_installed()


@pytest.fixture
def fmnist_required():
    check_fashion_mnist_installed()


@pytest.fixture(scope="module")
def fmnist_required_module():
    check_fashion_mnist_installed()


@pytest.fixture(autouse=True)
def _hermetic_home(tmp_path_factory, monkeypatch):
    """Point user cache/state directories at a temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("FEDDIFFUSE_HOME", str(home / "feddiffuse"))


# -- real servers for the PostgreSQL + S3 hub (tests/support/services.py) -------------------

@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL cluster for the session (each test takes a fresh database)."""
    from support.services import PostgresServer

    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS S3 gateway for the session (each test takes a fresh bucket)."""
    from support.services import SeaweedS3

    server = SeaweedS3()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server, monkeypatch) -> str:
    """The store URL of a fresh, empty database; PGPASSWORD is set for this test."""
    for k, v in postgres_server.env.items():
        monkeypatch.setenv(k, v)
    return postgres_server.create_database()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket's name; the AWS_* credentials are set for this test."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server.create_bucket()
