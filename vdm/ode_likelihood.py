"""Exact log-likelihood from the probability-flow ODE (Song et al. 2021, App. D; Chen et al. 2018;
Grathwohl et al. 2019, FFJORD). Pure math: no Flax, no config.

The VP forward process x = alpha x_0 + sigma eps has, written in its log-SNR lambda
(alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)), the SDE drift
f = (d log alpha / d lambda) x = sigma^2 x / 2 and diffusion g^2 = -d sigma^2/d lambda
- 2 sigma^2 d log alpha / d lambda = -sigma^2 per unit of -lambda, so its probability-flow ODE
dx = [f - g^2 score / 2] is, with score = -eps_hat / sigma,

    dx / d lambda = v(x, lambda) = (sigma^2 x - sigma eps_hat(x, lambda)) / 2.

Along a solution, d log p_lambda(x(lambda)) / d lambda = -div v (the instantaneous change of
variables), so from the data end lambda_max to the prior end lambda_min

    log p(x_0) = log N(x_T; 0, I) + int_{lambda_max}^{lambda_min} div v d lambda,
    div v = (sigma^2 D - sigma div eps_hat) / 2.

Conventions (score_sde's ``likelihood.py``): the data point is the ODE state at the
first (least noisy) level of the grid, the prior is N(0, I) at the last, and the result
is log p of the model's marginal at the first level. Divergence: exact (the trace from D
basis vectors; toy data and tests) or Hutchinson's estimator z^T (d eps_hat / dx) z with a fixed
probe z per trajectory (Rademacher or Gaussian), averaged over ``num_probes`` probes, whose
spread gives the standard error; both from vector-Jacobian products (one linearization per
evaluation, applied to every probe). score_sde integrates with adaptive RK45 from t = eps = 1e-5;
here a fixed grid with Heun's method (second order; its error falls as steps^-2) runs in one
``lax.scan`` in float32 whatever the network's dtype.

Time. Heun's method needs v only at the grid's levels, so the step is taken in lambda
between the levels of a grid of the model's own times: ``continuous_grid`` (t uniform in
[0, 1] for a continuous schedule, whose end points are finite, see schedules.py) or
``discrete_grid`` (integer timesteps of a discrete schedule, so the network only sees
the timesteps it was trained on and the log-SNR comes from the exact table; no
interpolation in t is needed). The ODE of a discrete model is that of the continuous
process through its table's levels; its first level is t = 1, not the data (lambda_0 = +inf).

8-bit images: ``dequantize`` adds uniform noise over each pixel's bin (width 2/255 in
[-1, 1]); E_u[-log p(x + u)] + D log(127.5) bounds -log P(k) (``losses.dequantized_nats``),
reported in bits/dim on the 8-bit scale by ``bits_per_dim_8bit``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion, losses

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def continuous_grid(log_snr_fn: Callable, num_steps: int):
    """(times, log_snr) of ``num_steps`` equal steps of t from 0 to 1 (float32 [num_steps + 1])."""
    _check_steps(num_steps)
    times = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)
    return times, jnp.asarray(log_snr_fn(times), jnp.float32)


def discrete_grid(log_snr_table, num_steps: int):
    """(times, log_snr) of a discrete schedule: ``num_steps + 1`` distinct integer timesteps
    round(linspace(1, T, num_steps + 1)) and their table log-SNR. Needs num_steps <= T - 1."""
    _check_steps(num_steps)
    T = int(np.shape(log_snr_table)[0]) - 1
    if num_steps > T - 1:
        raise ValueError(f"num_steps = {num_steps} needs a schedule with T >= {num_steps + 1} levels, got T = {T}")
    times = np.round(np.linspace(1, T, num_steps + 1)).astype(np.int32)
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"{num_steps} steps repeat timesteps of a T = {T} schedule")
    return jnp.asarray(times), jnp.asarray(log_snr_table)[times]


def _check_steps(num_steps):
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def _sum_dims(a):
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def _divergence_terms(model_fn, parameterization, x, t, lam, probes):
    """(v, z^T J z [P, B], sigma^2 D / 2, sigma) with J = d eps_hat / dx, one row per probe z
    (the D basis vectors for the exact trace); div v = sigma^2 D / 2 - sigma z^T J z / 2."""
    sigma2 = jax.nn.sigmoid(-lam)

    def f(y):
        out = model_fn(y, jnp.broadcast_to(t, y.shape[:1])).astype(jnp.float32)
        return diffusion.x0_eps_from_output(out, y, lam, parameterization)[1]

    eps, vjp = jax.vjp(f, x)  # reverse mode (as score_sde): also works through custom_vjp layers
    zj = jax.vmap(lambda z: vjp(z)[0])(probes)                                # z^T J per probe
    v = 0.5 * (sigma2 * x - jnp.sqrt(sigma2) * eps)
    quad = jax.vmap(lambda z, j: _sum_dims(z * j))(probes, zj)                # z^T J z, [P, B]
    D = math.prod(x.shape[1:])
    return v, quad, 0.5 * sigma2 * D, jnp.sqrt(sigma2)


def _probes(key, x, divergence, num_probes, probe):
    """[P, B, ...] probe vectors: the D basis vectors (exact) or random Rademacher / Gaussian."""
    if divergence == "exact":
        D = math.prod(x.shape[1:])
        basis = jnp.eye(D, dtype=jnp.float32).reshape((D,) + x.shape[1:])
        return jnp.broadcast_to(basis[:, None], (D,) + x.shape)
    shape = (num_probes,) + x.shape
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, jnp.float32)
    return jax.random.normal(key, shape, jnp.float32)


def ode_log_likelihood(model_fn: Callable, x, times, log_snr, key=None, *, parameterization: str = "eps",
                       divergence: str = "exact", num_probes: int = 4, probe: str = "rademacher") -> dict:
    """log p(x) of the model's marginal at the grid's first level, from the probability-flow ODE
    (see the module docstring), integrated with Heun's method over the grid, in nats per example.

    ``model_fn(x, t) -> output`` is the model in ``parameterization`` (x [B, ...], t [B] the
    model's own time; its output, in any dtype, is read as float32 and converted to eps_hat);
    ``times`` [N + 1] are the model times of the grid and ``log_snr`` [N + 1] their log-SNR,
    strictly decreasing and finite (``continuous_grid``, ``discrete_grid``). ``key`` draws
    the ``num_probes`` Hutchinson probes (one set per call, fixed along the trajectory as in
    FFJORD); each probe gives an unbiased estimate of log p(x).

    Returns a dict of log_prob [B] (the exact-divergence value, or the mean over probes),
    stderr [B] (the standard error over probes; 0 for the exact divergence), prior [B]
    (log N(x_T; 0, I)) and x_T.
    """
    diffusion.check_parameterization(parameterization)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if divergence == "hutchinson":
        if not isinstance(num_probes, int) or num_probes < 2:
            raise ValueError(f"num_probes must be an integer >= 2 (for the standard error), got {num_probes!r}")
        if key is None:
            raise ValueError("the Hutchinson estimator needs a key for its probes")
    times, log_snr = jnp.asarray(times), jnp.asarray(log_snr, jnp.float32)
    if times.ndim != 1 or times.shape != log_snr.shape or times.shape[0] < 2:
        raise ValueError(f"times and log_snr must be matching 1-D grids of >= 2 levels, got "
                         f"{times.shape} and {log_snr.shape}")
    if not isinstance(log_snr, jax.core.Tracer):
        lam = np.asarray(log_snr)
        if not (np.all(np.isfinite(lam)) and np.all(np.diff(lam) < 0)):
            raise ValueError("log_snr must be finite and strictly decreasing along the grid (data end "
                             "first): start at t = 1 of a discrete schedule, not at the data level")
    x = jnp.asarray(x, jnp.float32)
    probes = _probes(key, x, divergence, num_probes, probe)

    def field(x, t, lam):
        v, quad, half_sigma2_d, sigma = _divergence_terms(model_fn, parameterization, x, t, lam, probes)
        if divergence == "exact":
            quad = jnp.sum(quad, axis=0, keepdims=True)                        # the trace
        return v, half_sigma2_d - 0.5 * sigma * quad                          # div v, [P, B]

    def heun(carry, level):
        x, logdet = carry
        t, lam, t_next, lam_next = level
        h = lam_next - lam
        v, div = field(x, t, lam)
        x_pred = x + h * v
        v_next, div_next = field(x_pred, t_next, lam_next)
        return (x + 0.5 * h * (v + v_next), logdet + 0.5 * h * (div + div_next)), None

    P = probes.shape[0] if divergence == "hutchinson" else 1
    init = (x, jnp.zeros((P, x.shape[0]), jnp.float32))
    (x_T, integral), _ = jax.lax.scan(heun, init, (times[:-1], log_snr[:-1], times[1:], log_snr[1:]))
    D = math.prod(x.shape[1:])
    prior = -0.5 * _sum_dims(jnp.square(x_T)) - 0.5 * D * math.log(2 * math.pi)
    per_probe = prior + integral                                              # [P, B]
    stderr = (jnp.std(per_probe, axis=0, ddof=1) / math.sqrt(P) if P > 1
              else jnp.zeros_like(prior))
    return dict(log_prob=jnp.mean(per_probe, axis=0), stderr=stderr, prior=prior, x_T=x_T)


def dequantize(key, x, bin_width: float = losses.BIN_WIDTH_8BIT):
    """x + u, u uniform over the bin of width ``bin_width`` centred on each grid value (8-bit data
    in [-1, 1]: 2/255), the dequantization whose density bounds the discrete likelihood."""
    return x + (jax.random.uniform(key, jnp.shape(x), jnp.float32) - 0.5) * bin_width


def bits_per_dim_8bit(log_prob, num_dims: int):
    """-log p(x + u) of dequantized 8-bit data as bits/dim on the 8-bit scale: a bound on -log2 P(k)
    per dimension (adds log2(127.5); ``losses.dequantized_nats``)."""
    return losses.bits_per_dim(losses.dequantized_nats(-log_prob, num_dims), num_dims)
