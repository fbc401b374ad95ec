"""The headless command line: bad input gives one sentence and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from edge_images import make_images
from edge_realhub import RealHub, free_port
from typer.testing import CliRunner

from feddiffuse.edge_client.cli import app
from feddiffuse.edge_client.settings import client_home

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_sentence(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    sentence = lines[0]
    assert sentence.startswith("error: ") and sentence.endswith("."), sentence
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in sentence, sentence


def nothing_written() -> bool:
    home = Path(os.environ["FEDDIFFUSE_HOME"])
    return not home.exists() or not any(home.rglob("*"))


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "images", n=4)


def test_folder_with_no_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    result = invoke("join", "--hub", "http://127.0.0.1:9", "--token", "t", "--data", str(empty))
    assert_one_sentence(result, "No images found in", "choose a folder")
    assert nothing_written()


def test_missing_folder(tmp_path):
    result = invoke("join", "--hub", "http://127.0.0.1:9", "--token", "t", "--data",
                    str(tmp_path / "nope"))
    assert_one_sentence(result, "does not exist")
    assert nothing_written()


def test_unreachable_hub(images):
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke("join", "--hub", url, "--token", "t", "--data", str(images))
    assert_one_sentence(result, f"Cannot reach a hub at {url}", "connection refused")
    assert nothing_written()


def test_unresolvable_host(images):
    result = invoke("join", "--hub", "http://no-such-host.invalid:8000", "--token", "t",
                    "--data", str(images))
    assert_one_sentence(result, "Cannot reach a hub at http://no-such-host.invalid:8000")
    assert nothing_written()


@pytest.mark.parametrize("url", ["hub.example.org:8000", "ftp://hub.example.org", "http//hub",
                                 "http://hub:70000"])
def test_malformed_url(url, images):
    result = invoke("join", "--hub", url, "--token", "t", "--data", str(images))
    assert_one_sentence(result, "is not a valid hub URL")
    assert nothing_written()


def test_wrong_token_against_a_real_hub(tmp_path, images):
    hub = RealHub(tmp_path / "hub", method="full", clients=("alice",), rounds=1)
    hub.start_in_thread()
    try:
        result = invoke("join", "--hub", hub.url, "--token", "not-a-token", "--data",
                        str(images))
    finally:
        hub.stop()
    assert_one_sentence(result, "rejected the token", "wrong or has been revoked")
    assert nothing_written()


def test_unknown_device(images):
    result = invoke("join", "--hub", "http://127.0.0.1:9", "--token", "t", "--data",
                    str(images), "--device", "tpu")
    assert_one_sentence(result, "Unknown device 'tpu'")
    assert nothing_written()


def test_join_without_any_hub_says_how_to_start():
    result = invoke("join")
    assert_one_sentence(result, "pass --hub URL")
    assert nothing_written()


def test_sample_and_status_before_joining():
    assert_one_sentence(invoke("sample"), "join one first")
    assert_one_sentence(invoke("status"), "join one first")
    assert_one_sentence(invoke("status", "--hub", "http://h:1"), "has not joined")
    assert nothing_written()


def test_version_and_help():
    assert "feddiffuse-client 0.1.0" in invoke("version").output
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("join", "sample", "status"):
        assert command in result.output


def test_no_arguments_opens_the_terminal_app(monkeypatch):
    from feddiffuse.edge_client.tui import app as tui_app

    opened = []
    monkeypatch.setattr(tui_app.ClientApp, "run", lambda self: opened.append(self))
    result = invoke()
    assert result.exit_code == 0, result.output
    assert len(opened) == 1
    assert client_home() == Path(os.environ["FEDDIFFUSE_HOME"]) / "client"
