"""What the user types, and what the client keeps on disk."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
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
from feddiffuse.edge_client.state import HubFolder, hub_slug


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
    with pytest.raises(SetupError, match="No images found"):
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
    store = HubFolder("http://127.0.0.1:8000", home=tmp_path)
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
    store = HubFolder("http://h:1", home=tmp_path)
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
    store = HubFolder("http://h:1", home=tmp_path)
    with store.lock():
        import subprocess
        import sys
        code = ("import sys; from pathlib import Path; "
                "from feddiffuse.edge_client.state import HubFolder\n"
                f"s = HubFolder('http://h:1', home=Path({str(tmp_path)!r}))\n"
                "try:\n    s.lock().__enter__()\n"
                "except Exception as e:\n    print(type(e).__name__)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == HubLocked.__name__


def _real_world_folder(root):
    """A photo archive as people have them: the owner's images in many formats, plus the
    hidden and thumbnail folders that tools write, an AppleDouble file and a broken file."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def grey(side=28):
        return Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8))

    def colour(w=48, h=40):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    root.mkdir()
    for i in range(10):
        grey().save(root / f"grey_{i}.png")
    for i in range(4):
        colour().save(root / f"photo_{i}.jpg")
    colour().save(root / "scan.bmp")
    colour().save(root / "page.tiff")
    colour().save(root / "web.webp")
    grey().save(root / "still.gif")
    frames = [grey() for _ in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    rgba = Image.fromarray(rng.integers(0, 255, (28, 28, 4), dtype=np.uint8), "RGBA")
    (root / "album").mkdir()
    rgba.save(root / "album" / "logo.png")
    (root / ".thumbnails").mkdir()
    for i in range(5):
        grey(8).save(root / ".thumbnails" / f"t{i}.jpg")
    (root / "album" / "@eaDir" / "logo.png").mkdir(parents=True)
    for i in range(3):
        grey(8).save(root / "album" / "@eaDir" / "logo.png" / f"SYNOPHOTO_{i}.jpg")
    (root / "__MACOSX").mkdir()
    grey().save(root / "__MACOSX" / "grey_0.png")
    grey().save(root / "._grey_0.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_real_world_folder_gives_the_right_counts_and_one_line_per_conversion(tmp_path):
    from feddiffuse.shared.data import load_image_folder

    folder = _real_world_folder(tmp_path / "archive")
    scan = check_image_folder(folder)
    # 10 grey PNG + 4 JPEG + BMP + TIFF + WebP + 2 GIF + 1 RGBA PNG, and the broken file.
    assert (scan.files, scan.usable) == (21, 20)
    assert dict(scan.skipped) == {"hidden files and folders": 6,
                                  "thumbnail and tool folders": 4}
    assert scan.colour == 8 and scan.grayscale == 12
    assert scan.summary() == ("20 usable images, " + scan.summary().split(", ", 1)[1])
    assert "6 in hidden files and folders not used" in scan.summary()
    assert "4 in thumbnail and tool folders not used" in scan.summary()
    assert "1 unreadable skipped" in scan.summary()
    assert scan.conversion_notes(28, 1) == [
        "8 colour images will be converted to grayscale.",
        "7 images will be resized and centre-cropped to 28x28.",
        "1 image with transparency will be laid on a white background.",
        "1 animated or multi-page file: only the first frame is used.",
    ]
    assert scan.conversion_notes(48, 3)[0] == (
        "12 grayscale images will be used as colour images with three equal channels.")
    # Training uses exactly the images the scan counted as usable, in every format.
    with pytest.warns(RuntimeWarning, match="1 unreadable"):
        data = load_image_folder(folder, 28, 1)
    assert data.images.shape == (20, 1, 28, 28)


def test_a_folder_of_only_thumbnails_says_why_nothing_is_used(tmp_path):
    from PIL import Image

    (tmp_path / "nas" / "@eaDir").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "nas" / "@eaDir" / "t.jpg")
    with pytest.raises(SetupError, match=r"No images found .*\(1 in hidden or thumbnail"):
        check_image_folder(tmp_path / "nas")


def test_participant_says_each_conversion_once_in_plain_words(tmp_path):
    from feddiffuse.edge_client import events as ev
    from feddiffuse.edge_client.participant import Participant, ParticipantOptions

    folder = _real_world_folder(tmp_path / "archive")
    said = []
    participant = Participant(None, HubFolder("http://hub.test", home=tmp_path / "home"),
                              ParticipantOptions(data_dir=folder), said.append,
                              threading.Event())
    images = participant._training_images("tiny")
    assert images.shape == (20, 1, 28, 28)
    lines = [e.message for e in said if isinstance(e, ev.LogEvent)]
    assert "Skipped 1 unreadable image file(s); the first is " in lines[0]
    assert "Not used: 6 image file(s) in hidden files and folders." in lines
    assert "Not used: 4 image file(s) in thumbnail and tool folders." in lines
    assert "8 colour images will be converted to grayscale." in lines
    assert not any("Warning" in line or ".py:" in line or "NumPy" in line for line in lines)
    participant._training_images("tiny")  # cached: nothing is said twice
    assert len([e for e in said if isinstance(e, ev.LogEvent)]) == len(lines)
