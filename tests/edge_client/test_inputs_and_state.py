"""What the user types, and what the client keeps on disk."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from feddiffuse.edge_client.errors import HubLocked, SetupError
from feddiffuse.edge_client.inputs import (
    check_image_folder,
    check_token,
    normalize_hub_url,
    scan_image_folder,
)
from feddiffuse.edge_client.settings import Settings, client_home, settings_path
from feddiffuse.edge_client.state import HubStore, hub_slug


@pytest.mark.parametrize("text, expected", [
    ("http://hub.example.org:8000", "http://hub.example.org:8000"),
    ("  https://hub.example.org/fed/ ", "https://hub.example.org/fed"),
    ("http://127.0.0.1:8123/", "http://127.0.0.1:8123"),
    ("http://[::1]:9000", "http://[::1]:9000"),
])
def test_hub_urls_are_normalized(text, expected):
    assert normalize_hub_url(text) == expected


@pytest.mark.parametrize("text", ["", "hub.example.org", "localhost:8000", "ftp://hub", "http//x",
                                  "http://", "http://hub:99999", "http://hub/?x=1",
                                  "http://user:pw@hub"])
def test_malformed_urls_say_what_to_do_in_one_sentence(text):
    with pytest.raises(SetupError) as err:
        normalize_hub_url(text)
    message = str(err.value)
    assert message.endswith(".") and message.count(". ") == 0


def test_tokens_are_checked():
    assert check_token("  abc123 ") == "abc123"
    for bad in ("", "   ", "ab c"):
        with pytest.raises(SetupError):
            check_token(bad)


def test_folder_scan_counts_usable_images_and_sizes(image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"not a png")
    (image_dir / "notes.txt").write_text("ignored")
    scan = scan_image_folder(image_dir)
    assert scan.files == 17 and scan.usable == 16
    assert (28, 28) in scan.sizes and (56, 56) in scan.sizes
    text = scan.summary()
    assert "16 usable images" in text and "28x28" in text and "unreadable" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SetupError, match="No PNG or JPEG images"):
        check_image_folder(empty)
    with pytest.raises(SetupError, match="does not exist"):
        check_image_folder(tmp_path / "nope")


def test_settings_live_under_feddiffuse_home_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDIFFUSE_HOME", str(tmp_path / "fd"))
    assert client_home() == tmp_path / "fd" / "client"
    assert Settings.load() == Settings()
    Settings(hub_url="http://h:1", data_dir="/d", device="cpu").save()
    assert settings_path().is_file()
    assert Settings.load().device == "cpu"
    settings_path().write_text("{not json")
    assert Settings.load() == Settings()


def test_token_file_is_private_and_store_writes_nothing_until_asked(tmp_path):
    store = HubStore("http://127.0.0.1:8000", home=tmp_path)
    assert not store.root.exists()
    store.write_token("secret")
    mode = stat.S_IMODE(os.stat(store.token_path).st_mode)
    assert mode == 0o600
    os.chmod(store.token_path, 0o644)
    store.write_token("secret2")
    assert stat.S_IMODE(os.stat(store.token_path).st_mode) == 0o600
    assert store.read_token() == "secret2"
    assert hub_slug("http://a:1") != hub_slug("http://a:2")


def test_global_weights_merge_by_segment_and_checkpoints(tmp_path):
    store = HubStore("http://h:1", home=tmp_path)
    a = {"downs.0.w": torch.ones(2), "ups.0.w": torch.zeros(2)}
    store.merge_global(a, ("encoder", "decoder"), "v1", "tiny", 1)
    store.merge_global({"ups.0.w": torch.full((2,), 3.0)}, ("decoder",), "v2", "tiny", 2)
    held = store.load_global()
    assert held.version == "v2"
    assert held.segment_versions == {"encoder": "v1", "decoder": "v2"}
    assert torch.equal(held.tensors["ups.0.w"], torch.full((2,), 3.0))
    round_dir = store.round_dir(2, "v2" * 8)
    from feddiffuse.shared.wire import save_weights
    for epoch in (1, 2, 3):
        save_weights(store.checkpoint_path(round_dir, epoch), a, {"preset": "tiny"})
    assert store.latest_checkpoint(round_dir)[0] == 3
    store.clear_checkpoints(round_dir, keep=3)
    assert [p.name for p in round_dir.iterdir()] == ["epoch-003.safetensors"]


def test_one_process_per_hub(tmp_path):
    store = HubStore("http://h:1", home=tmp_path)
    with store.lock():
        import subprocess
        import sys
        code = ("import sys; from pathlib import Path; "
                "from feddiffuse.edge_client.state import HubStore\n"
                f"s = HubStore('http://h:1', home=Path({str(tmp_path)!r}))\n"
                "try:\n    s.lock().__enter__()\n"
                "except Exception as e:\n    print(type(e).__name__)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == HubLocked.__name__
