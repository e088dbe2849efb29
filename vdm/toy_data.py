"""Toy distributions in 1-D and 2-D, each a sampler and (where one exists) its exact log-density.

A distribution is a ``ToyDistribution(name, dim, sample, log_prob, sample_labelled, num_classes)``:

* ``sample(rng, n) -> float32 [n, dim]`` draws i.i.d. points; ``rng`` is anything
  ``np.random.default_rng`` accepts (a ``np.random.Generator`` or an int seed).
* ``log_prob(x) -> [...]`` is the exact log-density of ``x`` of shape ``[..., dim]``,
  written in ``jax.numpy`` (jit/vmap/grad-safe, accepts NumPy arrays), so a model's
  ELBO can be compared with the true negative log-likelihood. It is ``None`` for
  the Swiss roll, whose points lie on a curve and have no density in 2-D.
* ``sample_labelled(rng, n) -> (x, labels int32 [n])`` for a Gaussian mixture: the same
  points as ``sample`` with the same ``rng``, each with the index of its component (the
  class of class-conditional training); ``num_classes`` is the number of components.
  ``None`` and 0 for the other distributions.

``get(name)`` returns one of ``TOY_DISTRIBUTIONS``:

==============  ===  ================================================================
mixture1d       1    1/3 N(-4, 1) + 2/3 N(4, 1) (seed 002).
swissroll       2    sklearn ``make_swiss_roll`` (noise 0), columns [0, 2] / 10 (seed 003).
gaussians2d     2    1/2 N((-5, 0), I) + 1/2 N((5, 0), I), standardized per coordinate
                     (seed 004). The seed standardizes each batch by its own empirical
                     mean and std; here the population values are used (mean 0, std
                     (sqrt(26), 1)), which makes the density exact:
                     1/2 N((+-5/sqrt(26), 0), diag(1/26, 1)).
moons           2    two interleaved half circles (the geometry of sklearn
                     ``make_moons``, centred by (-0.5, -0.25)): a moon with probability
                     1/2, an angle theta ~ U(0, pi), plus N(0, 0.1^2 I). The density is
                     the 1-D integral over theta, evaluated by 128-node Gauss-Legendre
                     quadrature (its error is below float32 rounding at this noise level).
8gaussians      2    8 equally weighted N(c_k, (sqrt(2)/4)^2 I), centres at radius
                     2 sqrt(2) and angles k pi/4 (the FFJORD toy, Grathwohl et al. 2019).
checkerboard    2    uniform on the 8 unit squares of [-2, 2]^2 with floor(x) + floor(y)
                     even, density 1/8 there (the FFJORD toy without its factor 2).
==============  ===  ================================================================
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from sklearn.datasets import make_swiss_roll


class ToyDistribution(NamedTuple):
    name: str
    dim: int
    sample: Callable[..., np.ndarray]
    log_prob: Optional[Callable]
    sample_labelled: Optional[Callable] = None
    num_classes: int = 0


def _gaussian_mixture_log_prob(x, means, stds, weights):
    """log sum_k w_k N(x; mu_k, diag(std_k^2)) for x [..., D], means/stds [K, D], weights [K]."""
    x = jnp.asarray(x, jnp.float32)[..., None, :]  # [..., 1, D]
    means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
    z = (x - means) / stds
    log_comp = jnp.sum(-0.5 * z**2 - jnp.log(stds) - 0.5 * math.log(2 * math.pi), axis=-1)
    return logsumexp(log_comp + jnp.log(jnp.asarray(weights, jnp.float32)), axis=-1)


def _gaussian_mixture_sample_labelled(rng, n, means, stds, weights):
    """(x [n, D], component k [n]): k ~ Categorical(weights), x ~ N(means[k], diag(stds[k]^2))."""
    rng = np.random.default_rng(rng)
    means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
    k = rng.choice(len(weights), size=n, p=np.asarray(weights, np.float64))
    x = (means[k] + stds[k] * rng.standard_normal((n, means.shape[1]))).astype(np.float32)
    return x, k.astype(np.int32)


def _mixture(name, means, stds, weights) -> ToyDistribution:
    means = np.asarray(means, np.float64)
    stds = np.broadcast_to(np.asarray(stds, np.float64), means.shape)
    return ToyDistribution(
        name, means.shape[1],
        lambda rng, n: _gaussian_mixture_sample_labelled(rng, n, means, stds, weights)[0],
        lambda x: _gaussian_mixture_log_prob(x, means, stds, weights),
        lambda rng, n: _gaussian_mixture_sample_labelled(rng, n, means, stds, weights),
        len(weights))


# --- Swiss roll (seed 003) ---------------------------------------------------


def swissroll_sample(rng, n):
    """sklearn make_swiss_roll(n, noise=0)[:, [0, 2]] / 10.

    That is the curve t (cos t, sin t) / 10 with t ~ U(1.5 pi, 4.5 pi): no density in 2-D.
    """
    seed = int(np.random.default_rng(rng).integers(2**31))
    x, _ = make_swiss_roll(n_samples=n, noise=0.0, random_state=seed)
    return (x[:, [0, 2]] / 10.0).astype(np.float32)


# --- Moons -------------------------------------------------------------------

MOONS_NOISE = 0.1
_MOONS_OFFSET = np.array([-0.5, -0.25])
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(128)
_THETA = (_GL_NODES + 1.0) * (math.pi / 2)  # nodes mapped to [0, pi]


def _moon_points(theta, moon):
    """Point on the upper (moon 0) or lower (moon 1) half circle at angle theta, centred."""
    upper = np.stack([np.cos(theta), np.sin(theta)], -1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], -1)
    return np.where(np.asarray(moon)[..., None] == 0, upper, lower) + _MOONS_OFFSET


_MOON_CENTRES = np.concatenate([_moon_points(_THETA, 0), _moon_points(_THETA, 1)])  # [256, 2]
# int_0^pi (1/pi) f dtheta = sum_j (w_j / 2) f(theta_j); times 1/2 for each moon.
_MOON_WEIGHTS = np.concatenate([_GL_WEIGHTS, _GL_WEIGHTS]) / 4.0


def moons_sample(rng, n):
    rng = np.random.default_rng(rng)
    theta = rng.uniform(0.0, math.pi, n)
    moon = rng.integers(0, 2, n)
    return (_moon_points(theta, moon) + MOONS_NOISE * rng.standard_normal((n, 2))).astype(np.float32)


def moons_log_prob(x):
    """log of 1/2 sum_moon int_0^pi (1/pi) N(x; c_moon(theta), 0.1^2 I) dtheta, by Gauss-Legendre."""
    stds = np.full(_MOON_CENTRES.shape, MOONS_NOISE)
    return _gaussian_mixture_log_prob(x, _MOON_CENTRES, stds, _MOON_WEIGHTS)


# --- Checkerboard --------------------------------------------------------------


def checkerboard_sample(rng, n):
    rng = np.random.default_rng(rng)
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.mod(np.floor(x1), 2)
    return np.stack([x1, x2], -1).astype(np.float32)


def checkerboard_log_prob(x):
    x = jnp.asarray(x, jnp.float32)
    inside = jnp.all(jnp.abs(x) <= 2.0, axis=-1)
    black = jnp.mod(jnp.sum(jnp.floor(x), axis=-1), 2) == 0
    return jnp.where(inside & black, -math.log(8.0), -jnp.inf)


# --- Registry ----------------------------------------------------------------

_S26 = math.sqrt(26.0)
_ANGLES = np.arange(8) * math.pi / 4

TOY_DISTRIBUTIONS = {
    d.name: d for d in (
        _mixture("mixture1d", [[-4.0], [4.0]], 1.0, [1 / 3, 2 / 3]),
        ToyDistribution("swissroll", 2, swissroll_sample, None),
        _mixture("gaussians2d", [[-5 / _S26, 0.0], [5 / _S26, 0.0]], [1 / _S26, 1.0], [0.5, 0.5]),
        ToyDistribution("moons", 2, moons_sample, moons_log_prob),
        _mixture("8gaussians", 2 * math.sqrt(2) * np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], -1),
                 math.sqrt(2) / 4, np.full(8, 1 / 8)),
        ToyDistribution("checkerboard", 2, checkerboard_sample, checkerboard_log_prob),
    )
}


def get(name: str) -> ToyDistribution:
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; allowed: {sorted(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name]
