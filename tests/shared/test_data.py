"""Tests of the dataset loaders: Fashion-MNIST IDX files, image folders, CelebA, load_dataset."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from feddiffuse.shared import data
from feddiffuse.shared.data import (
    CELEBA_CLASSES,
    FASHION_MNIST_CLASSES,
    ImageDataset,
    celeba_class,
    conform_images,
    count_images,
    fashion_mnist_candidates,
    from_model_range,
    load_celeba,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    random_subset_indices,
    to_model_range,
)
from feddiffuse.shared.data import fashion_mnist as fm
from feddiffuse.shared.errors import DataNotFoundError, UserError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.requires_fmnist  # skipped without the data, failed in CI


class DownloadCalled(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Keep every test off the real user cache and the network; record download attempts."""
    cache = tmp_path / "user-cache"
    monkeypatch.setattr(fm, "default_cache_dir", lambda: cache)
    calls: list[dict] = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise DownloadCalled("no network in tests")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    return {"cache": cache, "calls": calls}


@pytest.fixture
def empty_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    system = tmp_path / "empty-system"
    system.mkdir()
    monkeypatch.setenv(fm.SYSTEM_DIR_ENV, str(system))
    return system


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a pair of gzipped IDX files the way the Fashion-MNIST distribution does."""
    folder.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = fm.FILES[split]
    n, h, w = images.shape
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
    (folder / images_name).write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))
    header = (0x801).to_bytes(4, "big") + n.to_bytes(4, "big")
    (folder / labels_name).write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


def tiny_split(n: int, value: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, 28, 28), value, dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


# --------------------------------------------------------------------------- Fashion-MNIST


@needs_real
def test_train_split_of_the_real_files() -> None:
    ds = load_fashion_mnist("train")
    assert ds.name == "fashion-mnist"
    assert ds.num_classes == 10 and len(FASHION_MNIST_CLASSES) == 10
    assert len(ds) == 60000
    assert ds.images.shape == (60000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.images.float().mean().item() == pytest.approx(72.94, abs=0.01)
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
    assert ds.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, t-shirt, t-shirt, dress, ...


@needs_real
def test_test_split_of_the_real_files() -> None:
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:3].tolist() == [9, 2, 1]


@needs_real
def test_cached_parse_returns_fresh_tensors() -> None:
    first = load_fashion_mnist("test")
    before = fm._parse_cached.cache_info().hits
    first.images.zero_()
    first.labels.fill_(3)
    second = load_fashion_mnist("test")
    assert fm._parse_cached.cache_info().hits == before + 1
    assert second.images.float().mean() > 50
    assert torch.bincount(second.labels).tolist() == [1000] * 10


def test_unknown_fashion_mnist_split() -> None:
    with pytest.raises(UserError, match="'train' and 'test'"):
        load_fashion_mnist("validation")


def test_candidates_order(tmp_path: Path, isolated: dict, empty_system_dir: Path) -> None:
    given = tmp_path / "given"
    assert fashion_mnist_candidates(given) == [
        given,
        given / "FashionMNIST" / "raw",
        isolated["cache"] / "FashionMNIST" / "raw",
        empty_system_dir,
    ]
    assert fashion_mnist_candidates(None) == [
        isolated["cache"] / "FashionMNIST" / "raw",
        empty_system_dir,
    ]


def test_system_dir_defaults_to_debian_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.SYSTEM_DIR_ENV, raising=False)
    assert fm.system_dir() == Path("/usr/share/datasets/fashion-mnist")


def test_data_dir_wins_over_everything(
    tmp_path: Path, isolated: dict, empty_system_dir: Path
) -> None:
    write_idx(tmp_path / "flat", "test", *tiny_split(3, 11))
    write_idx(tmp_path / "flat" / "FashionMNIST" / "raw", "test", *tiny_split(4, 22))
    write_idx(isolated["cache"] / "FashionMNIST" / "raw", "test", *tiny_split(5, 33))
    write_idx(empty_system_dir, "test", *tiny_split(6, 44))

    flat = load_fashion_mnist("test", data_dir=tmp_path / "flat")
    assert len(flat) == 3 and int(flat.images[0, 0, 0, 0]) == 11
    assert flat.labels.tolist() == [0, 1, 2]

    (tmp_path / "flat" / fm.FILES["test"][0]).unlink()  # flat copy incomplete: next candidate
    nested = load_fashion_mnist("test", data_dir=tmp_path / "flat")
    assert len(nested) == 4 and int(nested.images[0, 0, 0, 0]) == 22

    cached = load_fashion_mnist("test")  # no data_dir: the user cache beats the system dir
    assert len(cached) == 5 and int(cached.images[0, 0, 0, 0]) == 33

    for name in fm.FILES["test"]:
        (isolated["cache"] / "FashionMNIST" / "raw" / name).unlink()
    system = load_fashion_mnist("test")
    assert len(system) == 6 and int(system.images[0, 0, 0, 0]) == 44
    assert isolated["calls"] == []  # found every time: never tried to download


@needs_real
def test_torchvision_layout_with_real_files(tmp_path: Path, empty_system_dir: Path) -> None:
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in fm.FILES["test"]:
        os.symlink(REAL_DIR / name, raw / name)
    ds = load_fashion_mnist("test", data_dir=tmp_path / "root")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    # Only the test files are there: the train split is not found (system dir is empty).
    with pytest.raises(DataNotFoundError):
        load_fashion_mnist("train", data_dir=tmp_path / "root", download=False)


def test_unpacked_idx_files_are_accepted(tmp_path: Path, empty_system_dir: Path) -> None:
    write_idx(tmp_path / "d", "train", *tiny_split(7, 5))
    for name in fm.FILES["train"]:
        gz = tmp_path / "d" / name
        (tmp_path / "d" / name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    ds = load_fashion_mnist("train", data_dir=tmp_path / "d")
    assert len(ds) == 7 and int(ds.images.sum()) == 7 * 28 * 28 * 5


def test_not_found_names_all_three_ways(
    tmp_path: Path, isolated: dict, empty_system_dir: Path
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist("train", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "--data-dir" in message
    assert "dataset-fashion-mnist" in message
    assert str(isolated["cache"] / "FashionMNIST" / "raw") in message
    assert "online" in message and "torchvision" in message
    assert "DownloadCalled" in message  # the reason the download failed
    assert "\n" not in message
    assert isolated["calls"] and isolated["calls"][0]["download"] is True
    assert isolated["calls"][0]["root"] == str(isolated["cache"])


def test_no_download_attempt_when_download_is_false(isolated: dict, empty_system_dir: Path):
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", download=False)
    assert isolated["calls"] == []


def test_download_fills_the_cache_layout(
    monkeypatch: pytest.MonkeyPatch, isolated: dict, empty_system_dir: Path
) -> None:
    def fake_download(root: str, train: bool = True, download: bool = False):
        assert download
        split = "train" if train else "test"
        write_idx(Path(root) / "FashionMNIST" / "raw", split, *tiny_split(2 if train else 9, 7))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    ds = load_fashion_mnist("test")
    assert len(ds) == 9
    assert (isolated["cache"] / "FashionMNIST" / "raw" / fm.FILES["train"][0]).is_file()


def test_bad_magic_number(tmp_path: Path, empty_system_dir: Path) -> None:
    write_idx(tmp_path / "d", "test", *tiny_split(3, 1))
    labels = tmp_path / "d" / fm.FILES["test"][1]
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[3] = 0x03  # a labels file claiming to be an images file
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataNotFoundError, match="magic number"):
        load_fashion_mnist("test", data_dir=tmp_path / "d")


def test_truncated_and_corrupt_gzip(tmp_path: Path, empty_system_dir: Path) -> None:
    write_idx(tmp_path / "d", "test", *tiny_split(3, 1))
    images = tmp_path / "d" / fm.FILES["test"][0]
    whole = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(whole[:-10]))
    with pytest.raises(DataNotFoundError, match="truncated or corrupt"):
        load_fashion_mnist("test", data_dir=tmp_path / "d")
    images.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataNotFoundError, match="Could not read"):
        load_fashion_mnist("test", data_dir=tmp_path / "d")


def test_image_and_label_counts_must_match(tmp_path: Path, empty_system_dir: Path) -> None:
    images, _ = tiny_split(3, 1)
    write_idx(tmp_path / "d", "test", images, np.zeros(3, dtype=np.uint8))
    _, labels = tiny_split(4, 1)
    write_idx(tmp_path / "e", "test", np.zeros((4, 28, 28), np.uint8), labels)
    (tmp_path / "d" / fm.FILES["test"][1]).write_bytes(
        (tmp_path / "e" / fm.FILES["test"][1]).read_bytes()
    )
    with pytest.raises(DataNotFoundError, match="3 images but"):
        load_fashion_mnist("test", data_dir=tmp_path / "d")


# --------------------------------------------------------------------------- image folders


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def stripes(width: int, height: int) -> Image.Image:
    """Red outer quarters and a green middle half along the long side."""
    image = Image.new("RGB", (width, height), (0, 200, 0))
    if width >= height:
        q = width // 4
        image.paste((255, 0, 0), (0, 0, q, height))
        image.paste((255, 0, 0), (width - q, 0, width, height))
    else:
        q = height // 4
        image.paste((255, 0, 0), (0, 0, width, q))
        image.paste((255, 0, 0), (0, height - q, width, height))
    return image


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save(root / "a" / "wide.png", stripes(80, 40))
    save(root / "b" / "c" / "tall.PNG", stripes(40, 80))
    save(root / "b" / "grey.jpg", Image.new("L", (30, 50), 100))
    save(root / "d.JPEG", Image.new("RGB", (64, 48), (10, 20, 250)))
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent: white after compositing
    save(root / "e" / "clear.png", rgba)
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def load_quietly(*args, **kwargs) -> tuple[ImageDataset, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(*args, **kwargs)
    return ds, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_folder_loads_nested_mixed_images(image_tree: Path) -> None:
    ds, caught = load_quietly(image_tree, 16, 3)
    # Sorted paths: a/broken.png (bad), a/wide.png, b/c/tall.PNG, b/grey.jpg, d.JPEG, e/clear.png
    assert ds.images.shape == (5, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.labels is None and ds.num_classes == 0 and ds.name == str(image_tree)
    wide, tall, grey, blue, clear = ds.images.to(torch.int32)
    for striped in (wide, tall):  # the centre crop keeps only the green middle half
        assert striped[1].float().mean() > 185 and striped[0].float().mean() < 30
    assert torch.all((grey - 100).abs() <= 2)  # grey repeated into 3 equal channels
    assert torch.all(grey[0] == grey[1]) and torch.all(grey[1] == grey[2])
    assert torch.all((blue[2] - 250).abs() <= 3) and blue[0].float().mean() < 15
    assert torch.all(clear == 255)
    assert len(caught) == 1
    assert "1 unreadable" in str(caught[0].message)
    assert str(image_tree / "a" / "broken.png") in str(caught[0].message)


def test_folder_grayscale_output(image_tree: Path) -> None:
    ds, _ = load_quietly(image_tree, 12, 1)
    assert ds.images.shape == (5, 1, 12, 12)
    blue = ds.images[3, 0].to(torch.int32)  # luma of (10, 20, 250) is about 43
    assert torch.all((blue - 43).abs() <= 3)


def test_folder_limit_and_seed(image_tree: Path) -> None:
    first_two, _ = load_quietly(image_tree, 8, 3, limit=2)
    everything, _ = load_quietly(image_tree, 8, 3)
    assert torch.equal(first_two.images, everything.images[:2])
    seeded_a, _ = load_quietly(image_tree, 8, 3, limit=3, seed=5)
    seeded_b, _ = load_quietly(image_tree, 8, 3, limit=3, seed=5)
    assert len(seeded_a) == 3 and torch.equal(seeded_a.images, seeded_b.images)
    with pytest.raises(UserError):
        load_image_folder(image_tree, 8, 3, limit=0)


def test_count_images(image_tree: Path) -> None:
    assert count_images(image_tree) == 6  # five good images plus the broken one, not notes.txt
    assert data.folder.image_paths(image_tree)[0].name == "broken.png"


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(DataNotFoundError, match="No usable images found"):
        load_image_folder(tmp_path / "empty", 16, 3)
    assert count_images(tmp_path / "empty") == 0
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    with pytest.warns(RuntimeWarning, match="1 unreadable"):
        with pytest.raises(DataNotFoundError, match="1 candidate files were unreadable"):
            load_image_folder(only_bad, 16, 3)
    with pytest.raises(UserError, match="does not exist") as info:
        load_image_folder(tmp_path / "missing", 16, 3)
    assert not isinstance(info.value, DataNotFoundError)
    with pytest.raises(UserError, match="not a folder"):
        count_images(tmp_path / "empty" / "sub" / "readme.md")
    with pytest.raises(UserError, match="channels must be 1 or 3"):
        load_image_folder(tmp_path / "empty", 16, 4)


# --------------------------------------------------------------------------- CelebA

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()

# (male, young, hair colours set, partition, expected class or None when dropped)
FAKE_CELEBA = [
    (0, 1, ["Black_Hair"], 0, 0),
    (0, 1, ["Brown_Hair"], 0, 1),
    (0, 0, ["Blond_Hair"], 0, 6),
    (1, 1, ["Gray_Hair"], 0, 11),
    (1, 0, ["Black_Hair"], 0, 12),
    (1, 0, ["Gray_Hair"], 0, 15),
    (0, 1, [], 0, None),  # no hair colour: dropped
    (1, 1, ["Blond_Hair", "Brown_Hair"], 0, 9),  # two colours: Brown comes first in the order
    (0, 0, ["Brown_Hair"], 1, 5),
    (1, 1, [], 1, None),
    (1, 0, ["Blond_Hair"], 2, 14),
    (0, 1, ["Gray_Hair", "Black_Hair"], 2, 0),
]


def make_celeba(root: Path) -> Path:
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    attr_lines = [str(len(FAKE_CELEBA)), " ".join(ATTRIBUTES) + " "]
    partition_lines = []
    for i, (male, young, hair, part, _) in enumerate(FAKE_CELEBA, start=1):
        name = f"{i:06d}.jpg"
        # 178 x 218: a 20-row red band above and below the 178 x 178 centre that stays.
        picture = Image.new("RGB", (178, 218), (20, 20 * i, 200))
        picture.paste((255, 0, 0), (0, 0, 178, 20))
        picture.paste((255, 0, 0), (0, 198, 178, 218))
        picture.save(images / name, quality=95)
        values = {a: -1 for a in ATTRIBUTES}
        values.update({"Male": 1 if male else -1, "Young": 1 if young else -1})
        values.update({h: 1 for h in hair})
        attr_lines.append(name + " " + " ".join(f"{values[a]:2d}" for a in ATTRIBUTES))
        partition_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return folder


def expected(split: int | None) -> list[int]:
    return [c for *_, p, c in FAKE_CELEBA if c is not None and (split is None or p == split)]


def test_celeba_class_formula() -> None:
    def attrs(male: int, young: int, *hair: str) -> dict[str, int]:
        values = {a: -1 for a in ATTRIBUTES}
        values.update({"Male": male, "Young": young, **{h: 1 for h in hair}})
        return values

    assert celeba_class(attrs(-1, 1, "Black_Hair")) == 0
    assert celeba_class(attrs(1, -1, "Gray_Hair")) == 15
    assert celeba_class(attrs(1, 1, "Blond_Hair")) == 10
    assert celeba_class(attrs(-1, -1, "Blond_Hair", "Brown_Hair")) == 5
    assert celeba_class(attrs(1, 1)) is None
    assert len(set(CELEBA_CLASSES)) == 16
    assert CELEBA_CLASSES[0] == "female-young-black" and CELEBA_CLASSES[15] == "male-old-gray"
    assert CELEBA_CLASSES[9] == "male-young-brown"


def test_celeba_train_split(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    ds = load_celeba(tmp_path, image_size=16, split="train")
    assert ds.name == "celeba" and ds.num_classes == 16
    assert ds.images.shape == (7, 3, 16, 16)
    assert ds.labels.tolist() == expected(0) == [0, 1, 6, 11, 12, 15, 9]
    # The centre crop removed the red bands: red stays low everywhere, blue high.
    assert ds.images[:, 0].float().mean() < 45 and ds.images[:, 2].float().mean() > 180
    # Green encodes the file number (20 * i): image 8 (the two-colour one) is the 7th kept.
    assert abs(int(ds.images[6, 1].float().mean().round()) - 160) <= 4


def test_celeba_other_splits_and_root_forms(tmp_path: Path) -> None:
    folder = make_celeba(tmp_path)
    assert load_celeba(tmp_path, 8, "valid").labels.tolist() == expected(1) == [5]
    assert load_celeba(tmp_path, 8, "test").labels.tolist() == expected(2) == [14, 0]
    everything = load_celeba(folder, 8, "all")  # root pointing at celeba/ itself
    assert everything.labels.tolist() == expected(None)
    assert len(everything) == 10
    (folder / "list_eval_partition.txt").unlink()
    assert len(load_celeba(tmp_path, 8, "all")) == 10  # "all" needs no partition file
    with pytest.raises(DataNotFoundError, match="list_eval_partition.txt"):
        load_celeba(tmp_path, 8, "train")
    with pytest.raises(UserError, match="train, valid, test, all"):
        load_celeba(tmp_path, 8, "validation")


def test_celeba_limit_and_missing_images(tmp_path: Path) -> None:
    folder = make_celeba(tmp_path)
    limited = load_celeba(tmp_path, 8, "train", limit=3)
    assert limited.labels.tolist() == expected(0)[:3]
    seeded = load_celeba(tmp_path, 8, "train", limit=3, seed=1)
    again = load_celeba(tmp_path, 8, "train", limit=3, seed=1)
    assert seeded.labels.tolist() == again.labels.tolist()
    (folder / "img_align_celeba" / "000002.jpg").unlink()
    (folder / "img_align_celeba" / "000003.jpg").write_bytes(b"corrupt")
    with pytest.warns(RuntimeWarning, match="Skipped 2 unreadable CelebA image") as record:
        ds = load_celeba(tmp_path, 8, "train")
    assert len(record) == 1
    assert ds.labels.tolist() == [0, 11, 12, 15, 9]


def test_celeba_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="list_attr_celeba.txt"):
        load_celeba(tmp_path, 8)
    folder = make_celeba(tmp_path)
    (folder / "list_attr_celeba.txt").write_text("3\nMale Young\n000001.jpg 1 1\n")
    with pytest.raises(DataNotFoundError, match="Black_Hair"):
        load_celeba(tmp_path, 8)


# --------------------------------------------------------------------------- dataset helpers


def test_model_range_round_trip() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(from_model_range(x), pixels)
    assert from_model_range(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError):
        to_model_range(x)


def test_image_dataset_basics() -> None:
    images = torch.arange(6 * 4, dtype=torch.uint8).view(6, 1, 2, 2)
    strided = images.transpose(2, 3)
    ds = ImageDataset("toy", strided, torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32), 3)
    assert ds.images.is_contiguous() and ds.labels.dtype == torch.int64
    assert len(ds) == 6 and ds.image_shape == (1, 2, 2)
    sub = ds.subset(torch.tensor([4, 1]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1]
    assert torch.equal(sub.images[0], ds.images[4])
    assert ds.subset(ds.labels == 2).labels.tolist() == [2, 2]
    assert "n=6" in repr(ds)
    with pytest.raises(ValueError):
        ImageDataset("bad", images, torch.zeros(5, dtype=torch.int64), 1)
    with pytest.raises(TypeError):
        ImageDataset("bad", images.float(), None, 0)
    with pytest.raises(ValueError):
        ImageDataset("bad", images, None, 3)


def test_conform_images() -> None:
    red = torch.zeros(2, 3, 10, 10, dtype=torch.uint8)
    red[:, 0] = 255
    grey = conform_images(red, channels=1, image_size=10)
    assert grey.shape == (2, 1, 10, 10) and torch.all(grey == 76)  # 0.299 * 255
    flat = torch.full((3, 1, 28, 28), 90, dtype=torch.uint8)
    big = conform_images(flat, channels=3, image_size=64)
    assert big.shape == (3, 3, 64, 64) and torch.all(big == 90)
    assert conform_images(flat, channels=1, image_size=28) is flat
    wide = torch.zeros(1, 1, 20, 40, dtype=torch.uint8)
    wide[..., 10:30] = 200  # the middle half survives the centre crop
    assert torch.all(conform_images(wide, channels=1, image_size=10)[..., 2:8] >= 190)


# --------------------------------------------------------------------------- load_dataset


@needs_real
def test_load_dataset_fashion_mnist_limit_and_conversion() -> None:
    full = load_fashion_mnist("test")
    a = load_dataset("fashion-mnist", image_size=28, channels=1, split="test", limit=500, seed=3)
    b = load_dataset("Fashion-MNIST", image_size=28, channels=1, split="test", limit=500, seed=3)
    c = load_dataset("fashion-mnist", image_size=28, channels=1, split="test", limit=500, seed=4)
    assert len(a) == 500 and torch.equal(a.images, b.images)
    assert not torch.equal(a.labels, c.labels)
    chosen = random_subset_indices(len(full), 500, 3)
    assert torch.all(chosen[1:] > chosen[:-1])
    assert torch.equal(a.images, full.images[chosen]) and torch.equal(a.labels, full.labels[chosen])
    rgb = load_dataset("fashion-mnist", image_size=32, channels=3, split="test", limit=20, seed=3)
    assert rgb.images.shape == (20, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    assert torch.equal(rgb.labels, full.labels[random_subset_indices(len(full), 20, 3)])
    assert data.class_names(rgb) == FASHION_MNIST_CLASSES


def test_load_dataset_folder_and_celeba(tmp_path: Path, image_tree: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        folder = load_dataset(str(image_tree), image_size=8, channels=1)
    assert folder.images.shape == (5, 1, 8, 8) and folder.labels is None
    make_celeba(tmp_path / "cel")
    celeba = load_dataset("celeba", image_size=16, channels=1, data_dir=tmp_path / "cel")
    assert celeba.images.shape == (7, 1, 16, 16) and celeba.labels.tolist() == expected(0)
    assert data.class_names(celeba) == CELEBA_CLASSES


def test_load_dataset_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="fashion-mnist or celeba") as info:
        load_dataset("cifar10", image_size=32, channels=3)
    assert not isinstance(info.value, DataNotFoundError)
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("celeba", image_size=64, channels=3)
    with pytest.raises(UserError, match="limit"):
        load_dataset("fashion-mnist", image_size=28, channels=1, limit=0)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("./no/such/folder", image_size=28, channels=1)


def test_folder_walk_skips_hidden_and_tool_folders_and_reads_every_photo_format(
        tmp_path: Path) -> None:
    from feddiffuse.shared.data.folder import HIDDEN, TOOL, walk_images

    root = tmp_path / "photos"
    (root / "a" / ".cache").mkdir(parents=True)
    (root / "b" / "@eaDir").mkdir(parents=True)
    (root / "__MACOSX").mkdir()
    img = Image.new("L", (4, 4), 7)
    for name in ("x.png", "x.BMP", "x.gif", "x.tif", "x.webp", "x.pgm", "x.jpeg"):
        img.save(root / "a" / name)
    img.save(root / "a" / ".cache" / "c.png")
    img.save(root / "a" / "._x.png")
    img.save(root / "b" / "@eaDir" / "t.jpg")
    img.save(root / "__MACOSX" / "m.png")
    found, skipped = walk_images(root)
    assert [p.name for p in found] == sorted(["x.BMP", "x.gif", "x.jpeg", "x.pgm", "x.png",
                                              "x.tif", "x.webp"])
    assert skipped == {HIDDEN: 2, TOOL: 2}
    assert count_images(root) == 7
    data = load_image_folder(root, 4, 1)
    assert data.images.shape == (7, 1, 4, 4) and int(data.images.max()) == 7


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    data = load_image_folder(tmp_path, 2, 1)
    assert data.images[0, 0].tolist() == [[0, 128], [255, 64]]


def test_a_folder_and_a_dataset_resize_the_same_image_the_same_way(tmp_path: Path) -> None:
    """One resize rule: a client's folder and the same pixels in a simulation give one tensor."""
    rng = np.random.default_rng(3)
    for name, shape in (("wide.png", (40, 56)), ("tall.png", (61, 33))):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    folder = load_image_folder(tmp_path, 28, 1).images
    for k, name in enumerate(sorted(["tall.png", "wide.png"])):
        with Image.open(tmp_path / name) as im:
            raw = torch.from_numpy(np.array(im, dtype=np.uint8))[None, None]
        assert torch.equal(folder[k], conform_images(raw, channels=1, image_size=28)[0])
