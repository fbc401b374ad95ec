"""`feddiffuse fetch-data`: found, else apt-get (root or sudo -n), else torchvision, else one
sentence naming the ways. apt-get and the download are replaced by fakes that record calls."""

import gzip
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feddiffuse.shared.cli.main import app
from feddiffuse.shared.data import install
from feddiffuse.shared.data.fashion_mnist import ALL_FILES
from feddiffuse.shared.errors import DataNotFoundError


def write_idx(folder: Path, n: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ALL_FILES:
        if "images" in name:
            body = struct.pack(">IIII", 0x803, n, 28, 28) + bytes(n * 28 * 28)
        else:
            body = struct.pack(">II", 0x801, n) + bytes(n)
        with gzip.open(folder / name, "wb") as f:
            f.write(body)


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: an empty system folder and an empty user cache."""
    system = tmp_path / "system"
    monkeypatch.setenv("FEDDIFFUSE_FMNIST_SYSTEM_DIR", str(system))
    monkeypatch.setattr(install, "default_cache_dir", lambda: tmp_path / "cache")
    from feddiffuse.shared.data import fashion_mnist
    monkeypatch.setattr(fashion_mnist, "default_cache_dir", lambda: tmp_path / "cache")
    return system


class FakeApt:
    def __init__(self, system: Path, works: bool = True, needs_update: bool = False):
        self.system, self.works, self.needs_update = system, works, needs_update
        self.calls: list[list[str]] = []
        self.updated = False

    def __call__(self, args: list[str]) -> int:
        self.calls.append(args)
        if args[-2:] == ["update", "-qq"]:
            self.updated = True
            return 0
        if "install" in args and self.works and (self.updated or not self.needs_update):
            write_idx(self.system)
            return 0
        return 0 if args[-1] == "true" else 100


def no_download(_cache):
    return OSError("no network")


def test_found_data_needs_nothing(nowhere, monkeypatch):
    write_idx(nowhere)
    apt = FakeApt(nowhere)
    assert install.ensure_fashion_mnist(run=apt, download=no_download, log=lambda m: None) \
        == nowhere
    assert apt.calls == []


def test_root_installs_the_debian_package_updating_the_lists_first_if_needed(nowhere,
                                                                              monkeypatch):
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    apt = FakeApt(nowhere, needs_update=True)
    lines: list[str] = []
    assert install.ensure_fashion_mnist(run=apt, download=no_download, log=lines.append) \
        == nowhere
    assert apt.calls == [["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"],
                         ["apt-get", "update", "-qq"],
                         ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]]
    assert any("installed in" in line for line in lines)


def test_a_user_with_passwordless_sudo_uses_sudo_n(nowhere, monkeypatch):
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    apt = FakeApt(nowhere)
    install.ensure_fashion_mnist(run=apt, download=no_download, log=lambda m: None)
    assert apt.calls[0] == ["sudo", "-n", "true"]
    assert apt.calls[1][:3] == ["sudo", "-n", "apt-get"]


def test_without_apt_torchvision_downloads(nowhere, monkeypatch, tmp_path):
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    got = []

    def download(cache):
        got.append(cache)
        write_idx(cache / "FashionMNIST" / "raw")

    where = install.ensure_fashion_mnist(run=FakeApt(nowhere), download=download,
                                         log=lambda m: None)
    assert where == tmp_path / "cache" / "FashionMNIST" / "raw" and got == [tmp_path / "cache"]


def test_when_everything_fails_one_sentence_names_the_ways(nowhere, monkeypatch):
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")

    def no_sudo(args):  # sudo asks for a password: `sudo -n true` fails
        return 1

    with pytest.raises(DataNotFoundError) as info:
        install.ensure_fashion_mnist(run=no_sudo, download=no_download, log=lambda m: None)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert "torchvision" in message and "\n" not in message


def test_the_command_exits_2_with_the_sentence(nowhere, monkeypatch):
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    monkeypatch.setattr(install, "_download", no_download)
    monkeypatch.setattr(install.ensure_fashion_mnist, "__kwdefaults__",
                        {"log": print, "run": FakeApt(nowhere), "download": no_download})
    res = CliRunner().invoke(app, ["fetch-data"])
    assert res.exit_code == 2, res.output
    assert "error: Fashion-MNIST is not on this machine" in res.output
    assert "Traceback" not in res.output
