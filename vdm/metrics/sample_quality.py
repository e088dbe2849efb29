"""Sample-quality metrics: kernel MMD, sliced Wasserstein, mode fractions, the Fréchet distance.

Kernel MMD (unbiased estimator, Gretton et al. 2012, eq. 3), sliced Wasserstein
distance (Bonneel et al. 2015), and the Fréchet distance between Gaussian fits of
features (Heusel et al. 2017, eq. 6); the feature networks are in
``vdm.metrics.classifier`` and ``vdm.metrics.inception``.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

# ---------------------------------------------------------------------------
# Kernel MMD.
# ---------------------------------------------------------------------------


def _flat(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 2, got {x.shape}")
    return x.reshape(x.shape[0], -1)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x, y, max_points: int = 1000) -> float:
    """Median heuristic (Gretton et al. 2012, §8): the median pairwise distance of the pooled
    samples (the first ``max_points`` of each set)."""
    z = np.concatenate([_flat(x, "x")[:max_points], _flat(y, "y")[:max_points]])
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    return float(np.median(d))


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: np.ndarray, chunk: int = 1024) -> float:
    """sum_ij k(a_i, b_j) for k = mean over h of exp(-|a - b|^2 / (2 h^2)), in row chunks."""
    total = 0.0
    for i in range(0, len(a), chunk):
        d2 = _sq_dists(a[i:i + chunk], b)
        total += np.exp(-d2[..., None] / (2.0 * bandwidths ** 2)).mean(-1).sum()
    return float(total)


def mmd(x, y, bandwidths=None) -> float:
    """Unbiased estimate of the squared MMD between the distributions of x [N, ...] and y [M, ...]
    (Gretton et al. 2012, eq. 3):

      MMD_u^2 = sum_{i != j} k(x_i, x_j) / (N (N-1)) + sum_{i != j} k(y_i, y_j) / (M (M-1))
                - 2 sum_ij k(x_i, y_j) / (N M),

    with k the RBF kernel exp(-|a - b|^2 / (2 h^2)) averaged over ``bandwidths``
    (a number or a sequence; default the median heuristic). It is unbiased, so
    it can be slightly negative when the distributions are equal.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of dimensions, got {x.shape} and {y.shape}")
    h = np.atleast_1d(np.asarray(median_bandwidth(x, y) if bandwidths is None else bandwidths, np.float64))
    if np.any(h <= 0):
        raise ValueError(f"bandwidths must be positive, got {h}")
    n, m = len(x), len(y)
    # k(a, a) = 1 on the diagonal, so the off-diagonal sums drop N (resp. M) ones.
    kxx = (_kernel_sum(x, x, h) - n) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, h) - m) / (m * (m - 1))
    kxy = _kernel_sum(x, y, h) / (n * m)
    return kxx + kyy - 2.0 * kxy


# ---------------------------------------------------------------------------
# Sliced Wasserstein distance.
# ---------------------------------------------------------------------------


def wasserstein_1d(u, v, p: float = 2.0) -> np.ndarray:
    """W_p between empirical 1-D distributions, batched over leading axes: u [..., N], v [..., M].

    W_p^p = int_0^1 |F_u^{-1}(q) - F_v^{-1}(q)|^p dq, computed exactly for the
    step quantile functions by merging their breakpoints i/N and j/M.
    """
    u, v = np.sort(np.asarray(u, np.float64), -1), np.sort(np.asarray(v, np.float64), -1)
    n, m = u.shape[-1], v.shape[-1]
    q = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], q]))
    mid = q - widths / 2
    iu = np.minimum((mid * n).astype(int), n - 1)
    iv = np.minimum((mid * m).astype(int), m - 1)
    wpp = (np.abs(u[..., iu] - v[..., iv]) ** p * widths).sum(-1)
    return wpp ** (1.0 / p)


def sliced_wasserstein(key, x, y, num_projections: int = 128, p: float = 2.0) -> float:
    """Sliced Wasserstein distance (Bonneel et al. 2015):

      SW_p(x, y) = ( E_theta [ W_p^p(theta . x, theta . y) ] )^(1/p),

    theta uniform on the unit sphere, estimated with ``num_projections``
    directions drawn from ``key``. For 1-D data it is W_p itself.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of dimensions, got {x.shape} and {y.shape}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    theta = np.asarray(jax.random.normal(key, (num_projections, x.shape[1])), np.float64)
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    wp = wasserstein_1d(theta @ x.T, theta @ y.T, p)
    return float(np.mean(wp ** p) ** (1.0 / p))


def toy_sample_metrics(key, samples, reference, num_projections: int = 128) -> dict:
    """MMD (median-heuristic RBF, unbiased) and sliced W2 between model samples and fresh data."""
    return {"mmd": mmd(samples, reference),
            "sliced_wasserstein": sliced_wasserstein(key, samples, reference, num_projections)}


def mode_fractions(samples, centres) -> np.ndarray:
    """The fraction of samples [N, D] nearest to each of the mode centres [K, D] (or [K] in 1-D),
    e.g. the mass on each component of the seed 002 mixture (1/3, 2/3)."""
    x = _flat(samples, "samples")
    c = np.asarray(centres, np.float64).reshape(-1, x.shape[1])
    nearest = np.argmin(_sq_dists(x, c), axis=1)
    return np.bincount(nearest, minlength=len(c)) / len(x)


# ---------------------------------------------------------------------------
# Fréchet distance between Gaussian fits.
# ---------------------------------------------------------------------------


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, F], in float64."""
    f = _flat(features, "features")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2)
    (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

      d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2}).

    The matrix square root is taken of the symmetric PSD matrix
    cov1^{1/2} cov2 cov1^{1/2} by eigen-decomposition (same trace as
    (cov1 cov2)^{1/2}), so no complex parts or singular-matrix failures arise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if not (mu1.shape == mu2.shape and cov1.shape == cov2.shape == mu1.shape * 2):
        raise ValueError(f"shapes must be mu [F], cov [F, F] for both, got {mu1.shape}, {cov1.shape}, "
                         f"{mu2.shape}, {cov2.shape}")
    s1 = _psd_sqrt(cov1)
    w = np.linalg.eigvalsh(s1 @ cov2 @ s1)
    tr_sqrt = np.sqrt(np.clip(w, 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def frechet_distance_of_features(features_a, features_b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, F] and [M, F]."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def classifier_frechet_distance(features_fn: Callable, samples, real) -> float:
    """Fréchet distance between Gaussian fits of ``features_fn`` features of samples and of real
    images (``features_fn`` from ``load_or_train_classifier`` or ``inception_features``)."""
    return frechet_distance_of_features(features_fn(samples), features_fn(real))
