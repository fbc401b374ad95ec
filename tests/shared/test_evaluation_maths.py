"""The maths of the image metrics: Fréchet distance, unbiased KID, TF-FID resizing, names."""

import math

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.evaluation import (
    frechet_distance,
    frechet_distance_gaussians,
    kernel_distance,
    mmd2_unbiased,
    parse_metrics,
)
from feddiffuse.shared.evaluation.inception import tf_bilinear_resize
from feddiffuse.shared.evaluation.maths import polynomial_kernel


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    for n, d in ((50, 8), (20, 64), (300, 16)):
        a = torch.randn(n, d, generator=gen(n)) * 3 + 1
        assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * d)


def test_closed_form_for_two_gaussians():
    # Diagonal covariances: d^2 = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance_gaussians(m1, torch.diag(a), m2, torch.diag(b)) == \
        pytest.approx(expected, rel=1e-10)
    # A rotated pair keeps the distance (it is invariant under a common rotation).
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(1), dtype=torch.float64))
    s1, s2 = q @ torch.diag(a).double() @ q.T, q @ torch.diag(b).double() @ q.T
    assert frechet_distance_gaussians(q @ m1.double(), s1, q @ m2.double(), s2) == \
        pytest.approx(expected, rel=1e-8)
    # Large samples of those Gaussians approach the closed form.
    n = 40_000
    xa = m1 + torch.randn(n, 3, generator=gen(2), dtype=torch.float64) * a.sqrt()
    xb = m2 + torch.randn(n, 3, generator=gen(3), dtype=torch.float64) * b.sqrt()
    assert frechet_distance(xa, xb) == pytest.approx(expected, rel=0.03)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
@pytest.mark.parametrize(("n", "m", "d"), [(400, 300, 12), (30, 40, 64)])
def test_matches_pytorch_fid_on_the_same_statistics(n, m, d):
    mix = torch.randn(d, d, generator=gen(4), dtype=torch.float64)
    a = torch.randn(n, d, generator=gen(5), dtype=torch.float64).relu() * 2
    b = torch.randn(m, d, generator=gen(6), dtype=torch.float64) @ mix * 0.3 + 0.1
    ref = calculate_frechet_distance(a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False),
                                     b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-6)
    assert frechet_distance_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)) == \
        pytest.approx(float(ref), rel=1e-6)


def test_fewer_samples_than_dimensions_stays_real_and_finite():
    a = torch.randn(40, 512, generator=gen(7)).relu()
    b = torch.randn(40, 512, generator=gen(8)).relu() + 0.1
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0


def test_kid_is_unbiased_on_a_known_finite_distribution():
    # x and y are drawn uniformly from two fixed point sets, so the population MMD^2 is exact:
    # the mean kernel value over all ordered pairs (independent draws may repeat a point).
    points_x = torch.randn(6, 4, generator=gen(9), dtype=torch.float64)
    points_y = torch.randn(5, 4, generator=gen(10), dtype=torch.float64) + 0.4
    truth = float(polynomial_kernel(points_x, points_x).mean()
                  + polynomial_kernel(points_y, points_y).mean()
                  - 2 * polynomial_kernel(points_x, points_y).mean())
    g = gen(11)
    unbiased, biased = [], []
    for _ in range(3000):
        x = points_x[torch.randint(0, 6, (8,), generator=g)]
        y = points_y[torch.randint(0, 5, (8,), generator=g)]
        unbiased.append(mmd2_unbiased(x, y))
        biased.append(float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                            - 2 * polynomial_kernel(x, y).mean()))
    u = torch.tensor(unbiased)
    stderr = float(u.std()) / math.sqrt(len(u))
    assert abs(float(u.mean()) - truth) < 4 * stderr
    assert abs(float(torch.tensor(biased).mean()) - truth) > 10 * stderr  # the biased one is off


def test_kid_of_one_distribution_averages_to_zero():
    g = gen(12)
    values = torch.tensor([mmd2_unbiased(torch.randn(10, 3, generator=g),
                                         torch.randn(10, 3, generator=g)) for _ in range(2000)])
    assert abs(float(values.mean())) < 4 * float(values.std()) / math.sqrt(len(values))
    assert float(values.min()) < 0  # unbiased: it does go below zero


def test_kid_uses_seeded_subsets_for_large_sets():
    a = torch.randn(300, 8, generator=gen(13))
    b = torch.randn(300, 8, generator=gen(14)) + 0.5
    whole, none = kernel_distance(a, b)
    assert none is None and whole > 0
    first = kernel_distance(a, b, subset_size=100, subsets=10, seed=3)
    assert first == kernel_distance(a, b, subset_size=100, subsets=10, seed=3)
    assert first[1] is not None and first[1] > 0
    assert first[0] == pytest.approx(whole, rel=0.5)


def test_tf_bilinear_resize_uses_tensorflow_1_coordinates():
    # TF1 resize_bilinear (align_corners=False, no half-pixel centres): source = target * in/out,
    # clamped at the last pixel.
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    out = tf_bilinear_resize(x, size=8)
    assert out[0, 0, 0].tolist() == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    # The same as the grid_sample formulation used by NVIDIA's and fid-helper's ports.
    img = torch.rand(2, 1, 28, 28, generator=gen(15)) * 255
    theta = torch.tensor([[1 + 0.0, 0, 1 / 28 - 1 / 299], [0, 1.0, 1 / 28 - 1 / 299]])
    grid = torch.nn.functional.affine_grid(theta.expand(2, 2, 3), [2, 1, 299, 299],
                                           align_corners=False)
    ref = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    assert torch.allclose(tf_bilinear_resize(img), ref, atol=0.05)


def test_metric_names_expand_kid_beside_each_frechet_metric():
    assert parse_metrics("fid,fd_fmnist,kid") == ["fid", "kid_inception", "fd_fmnist",
                                                  "kid_fmnist"]
    assert parse_metrics("fd_fmnist, kid") == ["fd_fmnist", "kid_fmnist"]
    assert parse_metrics("kid_inception") == ["kid_inception"]
    with pytest.raises(UserError, match="Unknown metric 'is'"):
        parse_metrics("fid,is")
    with pytest.raises(UserError, match="beside fid or fd_fmnist"):
        parse_metrics("kid")
