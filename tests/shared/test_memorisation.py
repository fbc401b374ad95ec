"""The memorisation audit's maths on images whose answer is known: copies of the owner's
images are flagged, other images of the same kind are not, and the threshold is the owner's
own leave-one-out 5th percentile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from feddiffuse.shared.data import load_fashion_mnist
from feddiffuse.shared.evaluation.features import FashionMNISTFeatures, Unavailable
from feddiffuse.shared.evaluation.memorisation import (
    COPY_RGB,
    TooFewImages,
    audit_images,
    audit_model,
    binomial_tail,
    calibrate,
    choose_feature_space,
    nearest_neighbours,
    pixel_vectors,
    save_pairs,
)
from feddiffuse.shared.model import build_unet


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread: on a shared two-core machine two OpenMP threads per process wait for each
    other far more than they help these small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(fmnist_required_module):
    return load_fashion_mnist("train").images


def test_binomial_tail_is_exact():
    assert binomial_tail(0, 10, 0.05) == 1.0
    assert binomial_tail(10, 10, 0.05) == pytest.approx(0.05 ** 10)
    assert binomial_tail(1, 20, 0.05) == pytest.approx(1 - 0.95 ** 20)


def test_thresholds_are_quantiles_of_leave_one_out_distances_and_ratios():
    # Points on a line at 0, 1, 3, 6, 10, 15: nearest other point at 1, 1, 2, 3, 4, 5.
    rows = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0], [15.0]])
    cal = calibrate(rows, quantile=0.5)
    assert cal.threshold == pytest.approx(2.5) and cal.median == 2.0  # torch's lower median
    assert cal.k == 5  # nearest over the 5th nearest (here: the farthest other point)
    # Ratios: 1/15, 1/14, 2/12, 3/9, 4/10, 5/15; their median is (2/12 + 5/15) / 2.
    assert cal.ratio_threshold == pytest.approx((2 / 12 + 5 / 15) / 2)
    # Under both: the points at 0, 1 and 3 (distances 1, 1, 2; ratios 1/15, 1/14, 2/12) of 6.
    assert cal.chance == pytest.approx((3 + 1) / (6 + 1))
    dist, index = nearest_neighbours(torch.tensor([[2.4], [9.0]]), rows, k=2)
    assert torch.allclose(dist, torch.tensor([[0.6, 1.4], [1.0, 3.0]], dtype=torch.float64))
    assert index.tolist() == [[2, 1], [4, 3]]


def test_a_sample_equally_near_many_own_images_is_no_copy():
    """Carlini et al.'s ratio test: a dark, featureless sample may be as near as a copy to the
    plainest images of a folder, but it is as near to all of them."""
    g = torch.Generator().manual_seed(0)
    plain = torch.randint(0, 40, (12, 1, 8, 8), dtype=torch.uint8, generator=g)  # dark
    busy = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=g)
    own = torch.cat([plain, busy])
    dark = torch.full((8, 1, 8, 8), 20, dtype=torch.uint8)
    result = audit_images(dark, own)
    pixels = result.spaces["pixels"]
    assert all(d < pixels.threshold for d in pixels.distances)  # as near as a copy...
    assert pixels.copies == 0 and not result.flagged  # ...but no nearer to one than to others
    copies = audit_images(noisy(busy[:8], 2, amplitude=3), own)
    assert copies.spaces["pixels"].copies == 8 and copies.flagged


def test_pixel_distance_is_the_root_mean_square_difference():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    b = torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
    b[0, 0, :2] = 0  # half the pixels differ by 1
    d = torch.cdist(pixel_vectors(a), pixel_vectors(b))
    assert float(d) == pytest.approx(math.sqrt(0.5))


def noisy(images: torch.Tensor, seed: int, amplitude: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-amplitude, amplitude + 1, images.shape, generator=g)
    return (images.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def test_copies_are_flagged_and_new_images_of_the_same_kind_are_not(fmnist):
    own = fmnist[:200]
    features = FashionMNISTFeatures()
    # 16 of the owner's images, slightly noisy, among 16 new ones: a model that copies half
    # the time.
    copying = torch.cat([noisy(own[:16], 1), fmnist[5000:5016]])
    result = audit_images(copying, own, features)
    assert result.flagged and set(result.spaces) == {"pixels", "fmnist"}
    for space in result.spaces.values():
        assert space.flagged and space.copies >= 16, space
        assert space.nearest[:16] == list(range(16))
    assert result.pairs[0].copy and result.pairs[0].own == result.pairs[0].sample
    assert result.copies >= 16
    # 64 new Fashion-MNIST images: a model that makes new images of the owner's kind.
    fresh = audit_images(fmnist[6000:6064], own, features)
    assert not fresh.flagged, fresh.to_dict()["spaces"]
    assert all(s.copy_rate <= 0.1 for s in fresh.spaces.values())


def test_folders_too_small_to_calibrate_are_refused(fmnist):
    with pytest.raises(TooFewImages, match="too few"):
        audit_images(fmnist[:4], fmnist[:9])


def test_feature_space_is_the_classifier_for_fmnist_and_inception_or_none_otherwise():
    assert isinstance(choose_feature_space(1, 28), FashionMNISTFeatures)
    other = choose_feature_space(3, 64)
    assert isinstance(other, Unavailable) or other.family == "inception"


def test_audit_model_is_seeded(fmnist):
    model = build_unet("tiny", seed=0)
    from feddiffuse.shared.diffusion import DiffusionSchedule, SamplerSpec

    schedule = DiffusionSchedule.linear(10, 0.05, 0.7)
    spec = SamplerSpec("ddim", 3)
    a, sa = audit_model(model, fmnist[:20], 4, sampler=spec, seed=3, schedule=schedule)
    b, sb = audit_model(model, fmnist[:20], 4, sampler=spec, seed=3, schedule=schedule)
    c, sc = audit_model(model, fmnist[:20], 4, sampler=spec, seed=4, schedule=schedule)
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert a.to_dict() == b.to_dict() and a.seed == 3 and a.sampler["steps"] == 3


def test_pairs_picture_puts_each_sample_beside_its_nearest_own_image(fmnist, tmp_path):
    own = fmnist[:40]
    samples = torch.cat([own[5:6], fmnist[7000:7002]])  # one exact copy, two new images
    result = audit_images(samples, own)
    path = save_pairs(result, samples, own, tmp_path / "pairs.png")
    with Image.open(path) as png:
        array = np.asarray(png.convert("RGB"))
    assert path.stat().st_mode & 0o077 == 0  # the owner's images stay private
    first = result.pairs[0]
    assert (first.sample, first.own, first.copy) == (0, 5, True) and first.distance == 0
    # 3 pairs in one row: 8 + 3 * (2 * 56 + 2 + 4 + 8) wide, 8 + 56 + 4 + 8 high.
    assert array.shape == (76, 8 + 3 * 126, 3)
    assert tuple(array[8, 8]) == COPY_RGB  # the copy's frame
    left = array[10:66, 10:66, 0]  # the sample at twice its size, beside the own image
    right = array[10:66, 68:124, 0]
    assert np.array_equal(left, right)
    assert np.array_equal(left[::2, ::2], own[5, 0].numpy())
    assert tuple(array[8, 8 + 126]) == (255, 255, 255)  # a new image: no frame


def test_the_kept_memorising_model_is_what_its_script_makes():
    """tests/support/memorising.py trains deterministically (so its kept weights can be made
    again), and the kept file says how it was made."""
    from safetensors import safe_open
    from support import memorising

    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    a, b = memorising.train(images, steps=2), memorising.train(images, steps=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(memorising.WEIGHTS), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(a)
    assert meta == {"preset": "tiny", "steps": str(memorising.STEPS),
                    "memorised": "fmnist-train[0:16]"}
