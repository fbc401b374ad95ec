"""Fréchet distance and kernel (inception) distance between two sets of feature vectors.

Written here rather than taken from pytorch-fid: its scipy ``sqrtm`` takes 20-40 s per 2048-d
pair on 2 cores and raises on the rank-deficient covariances of a few hundred samples, while
the factored form below is exact, takes about a second and never goes complex.
(The test suite checks it against pytorch-fid's ``calculate_frechet_distance``.)
"""

from __future__ import annotations

import torch


def _as_features(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("features must be an N x D matrix with N >= 2")
    return x.to(torch.float64)


def _cov_factor(features: torch.Tensor) -> torch.Tensor:
    """A D x r matrix F with F F^T = the sample covariance, r = min(N, D).

    With N <= D the centred features themselves are a factor (rank <= N); otherwise the
    Cholesky factor of the covariance (a tiny jitter keeps it defined if it is singular).
    """
    n, d = features.shape
    centred = (features - features.mean(0)) / (n - 1) ** 0.5
    if n <= d:
        return centred.T
    cov = centred.T @ centred
    jitter = 0.0
    scale = float(cov.diagonal().mean()) or 1.0
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(d, dtype=cov.dtype))
        if int(info) == 0:
            return factor
        jitter = scale * 1e-12 if jitter == 0.0 else jitter * 100
    raise ValueError("the feature covariance could not be factored")


def nuclear_norm(m: torch.Tensor) -> float:
    """Sum of singular values, via the eigenvalues of the smaller Gram matrix (symmetric
    eigenvalues are several times faster than an SVD on a CPU, and exact enough here)."""
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features `a` (N x D) and `b` (M x D).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)) (Dowson & Landau 1982;
    Heusel et al. 2017 for FID). With S_a = F F^T and S_b = G G^T, the eigenvalues of S_a S_b
    are the squared singular values of F^T G, so tr((S_a S_b)^(1/2)) is its nuclear norm.
    """
    a, b = _as_features(a), _as_features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError("both feature sets must have the same dimension")
    fa, fb = _cov_factor(a), _cov_factor(b)
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    trace_term = float((fa ** 2).sum() + (fb ** 2).sum())
    cross = nuclear_norm(fa.T @ fb)
    return max(mean_term + trace_term - 2.0 * cross, 0.0)


def frechet_distance_gaussians(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                               sigma2: torch.Tensor) -> float:
    """The same distance from means and covariance matrices (symmetric square roots)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root @ s2 @ root)
    cross = float(inner.clamp(min=0).sqrt().sum())
    value = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace()) - 2.0 * cross
    return max(value, 0.0)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^degree, the kernel of KID (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3) -> float:
    """The unbiased estimator of the squared MMD (Gretton et al. 2012, eq. 3): the diagonals
    of the within-set kernel matrices are left out, so its expectation is the true MMD^2
    (zero for two samples of one distribution; it can come out slightly negative)."""
    x, y = _as_features(x), _as_features(y)
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree)
    kxy = polynomial_kernel(x, y, degree)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_distance(x: torch.Tensor, y: torch.Tensor, subset_size: int = 1000,
                    subsets: int = 100, seed: int = 0) -> tuple[float, float | None]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel. Returns (value, std).

    Written here (a dozen lines) because the libraries draw their subsets without a seed.
    With both sets no larger than `subset_size` the whole sets are used once (std None);
    otherwise the mean and standard deviation over `subsets` seeded random subsets, as in
    Bińkowski et al. (2018).
    """
    x, y = _as_features(x), _as_features(y)
    if max(x.shape[0], y.shape[0]) <= subset_size:
        return mmd2_unbiased(x, y), None
    size = min(subset_size, x.shape[0], y.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=generator)[:size]
        iy = torch.randperm(y.shape[0], generator=generator)[:size]
        values.append(mmd2_unbiased(x[ix], y[iy]))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std())
