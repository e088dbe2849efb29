"""The exact optimal denoiser of a Gaussian mixture, with the interface of a network.

For data x_0 ~ sum_k w_k N(mu_k, diag(v_k)) and x_t = alpha x_0 + sigma eps, the
marginal q(x_t) is the mixture sum_k w_k N(alpha mu_k, diag(alpha^2 v_k + sigma^2)),
and conditioning on x_t is closed-form (e.g. Karras et al. 2022, App. B.3):

  r_k(x_t)        = w_k N(x_t; alpha mu_k, alpha^2 v_k + sigma^2) / q(x_t)   (responsibilities)
  E[x_0|x_t, k]   = mu_k + alpha v_k (x_t - alpha mu_k) / (alpha^2 v_k + sigma^2)
  E[eps|x_t, k]   = sigma (x_t - alpha mu_k) / (alpha^2 v_k + sigma^2)
  E[x_0|x_t]      = sum_k r_k E[x_0|x_t, k],  E[eps|x_t] likewise,
  grad log q(x_t) = -E[eps|x_t] / sigma                                        (Tweedie).

x0 and eps are computed directly (not one from the other), so every
parameterization is exact to float32 rounding at every noise level.
``model_fn`` wraps them as ``model_fn(x_t, t) -> output`` in any
parameterization, for a discrete schedule (int t in 1..T) or a continuous one
(float t in [0, 1]); with a learned variance type it appends the moment-matched
variance of the step t -> t-1 (Bao et al. 2022, Analytic-DPM, per x_t), for
learned_range clipped to the range [beta~_t, beta_t] the interpolation spans
(unclipped, a respaced chain would extrapolate the one-step fraction far
outside its stride's bounds).
``conditional_model_fn`` adds a class label: label k is component k alone and
the null label K is the whole mixture (classifier-free guidance tests), and
``classifier_log_prob`` is the exact posterior classifier log p(k | x_t) (classifier guidance tests).

Data have shape [B, D]; a 1-D mixture has D = 1.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion
from vdm.schedules import DiscreteSchedule


class GaussianMixture(NamedTuple):
    """weights [K] (summing to 1), means [K, D], variances [K, D] (diagonal components)."""

    weights: jax.Array
    means: jax.Array
    variances: jax.Array


def gaussian_mixture(weights, means, variances) -> GaussianMixture:
    """Build a mixture of K components in D dimensions.

    ``means`` is [K, D], or [K] for a 1-D mixture. ``variances`` is a scalar
    (shared isotropic), [K] (isotropic per component) or [K, D] (diagonal).
    """
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    if w.ndim != 1 or w.size < 1 or np.any(w <= 0) or abs(w.sum() - 1) > 1e-6:
        raise ValueError(f"weights must be a positive vector summing to 1, got {weights!r}")
    if mu.ndim == 1:
        mu = mu[:, None]
    if mu.ndim != 2 or mu.shape[0] != w.size:
        raise ValueError(f"means must have shape [K] or [K, D] with K = {w.size}, got {mu.shape}")
    v = np.asarray(variances, np.float64)
    if v.ndim == 1 and v.shape == (w.size,):
        v = v[:, None]
    try:
        v = np.broadcast_to(v, mu.shape)
    except ValueError:
        raise ValueError(f"variances must be a scalar, [K] or [K, D] = {mu.shape}, got shape {v.shape}") from None
    if np.any(v <= 0):
        raise ValueError("variances must be positive")
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    return GaussianMixture(as32(w), as32(mu), as32(v))


def sample(key, mixture: GaussianMixture, n: int):
    """n exact samples x_0 ~ mixture, shape [n, D]."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(mixture.weights), shape=(n,))
    noise = jax.random.normal(k_noise, (n, mixture.means.shape[1]))
    return mixture.means[comp] + jnp.sqrt(mixture.variances[comp]) * noise


def _level(log_snr, x):
    """alpha, sigma as [B, 1, 1] (or scalars) to broadcast against [B, K, D]."""
    alpha, sigma = diffusion.alpha_sigma(jnp.asarray(log_snr, jnp.float32))
    if alpha.ndim:
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]
    return alpha, sigma


def _log_joint(mixture: GaussianMixture, x_t, log_snr, log_weights):
    """log w_k + log N(x_t; alpha mu_k, alpha^2 v_k + sigma^2), shape [B, K]."""
    alpha, sigma = _level(log_snr, x_t)
    var = alpha ** 2 * mixture.variances + sigma ** 2                       # [(B), K, D]
    diff = x_t[:, None, :] - alpha * mixture.means                         # [B, K, D]
    log_n = -0.5 * jnp.sum(diff ** 2 / var + jnp.log(2 * math.pi * var), axis=-1)
    if log_weights is None:
        log_weights = jnp.log(mixture.weights)
    return log_weights + log_n


def responsibilities(mixture: GaussianMixture, x_t, log_snr=jnp.inf, log_weights=None):
    """r_k(x_t) = p(component k | x_t) under q(x_t), shape [B, K]. log_snr = +inf: the data level.

    ``log_weights`` [B, K] replaces log w_k per example (used by the conditional model).
    """
    return jax.nn.softmax(_log_joint(mixture, x_t, log_snr, log_weights), axis=-1)


def classifier_log_prob(mixture: GaussianMixture) -> Callable:
    """The exact noisy classifier ``log_prob(x_t, log_snr, labels) -> [B]``: log r_y(x_t), the log
    responsibility of component y (log-softmax, finite where r_y underflows), for classifier guidance."""
    def log_prob(x_t, log_snr, labels):
        log_r = jax.nn.log_softmax(_log_joint(mixture, x_t, log_snr, None), axis=-1)
        return jnp.take_along_axis(log_r, jnp.asarray(labels)[:, None], axis=-1)[:, 0]

    return log_prob


def posterior(mixture: GaussianMixture, x_t, log_snr, log_weights=None):
    """(E[x_0|x_t], Var[x_0|x_t] per dimension, E[eps|x_t]), each [B, D]. See the module docstring."""
    alpha, sigma = _level(log_snr, x_t)
    r = responsibilities(mixture, x_t, log_snr, log_weights)[..., None]     # [B, K, 1]
    var = alpha ** 2 * mixture.variances + sigma ** 2
    resid = (x_t[:, None, :] - alpha * mixture.means) / var                # [B, K, D]
    x0_k = mixture.means + alpha * mixture.variances * resid
    x0_var_k = mixture.variances * sigma ** 2 / var
    x0 = jnp.sum(r * x0_k, axis=1)
    x0_var = jnp.sum(r * (x0_var_k + (x0_k - x0[:, None, :]) ** 2), axis=1)  # law of total variance
    eps = jnp.sum(r * sigma * resid, axis=1)
    return x0, x0_var, eps


def score(mixture: GaussianMixture, x_t, log_snr):
    """grad_x log q(x_t) = -sum_k r_k (x_t - alpha mu_k) / (alpha^2 v_k + sigma^2)."""
    alpha, sigma = _level(log_snr, x_t)
    r = responsibilities(mixture, x_t, log_snr)[..., None]
    var = alpha ** 2 * mixture.variances + sigma ** 2
    return -jnp.sum(r * (x_t[:, None, :] - alpha * mixture.means) / var, axis=1)


def _time_to_log_snr(schedule, log_snr_fn):
    if (schedule is None) == (log_snr_fn is None):
        raise ValueError("give exactly one of schedule (a DiscreteSchedule) or log_snr_fn (continuous time)")
    if schedule is not None:
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError(f"schedule must be a DiscreteSchedule, got {type(schedule).__name__}")
        return lambda t: schedule.log_snr[t]
    return lambda t: log_snr_fn(jnp.asarray(t, jnp.float32))


def _build(mixture, parameterization, schedule, log_snr_fn, variance_type, log_weights_fn):
    diffusion.check_parameterization(parameterization)
    learned = diffusion.learns_variance(variance_type)
    if learned and schedule is None:
        raise ValueError(f"variance_type {variance_type!r} refers to the step t -> t-1 and needs a "
                         "discrete schedule; continuous time uses fixed_small or fixed_large")
    log_snr_of = _time_to_log_snr(schedule, log_snr_fn)

    def apply(x_t, t, cond):
        lam = log_snr_of(t)
        x0, x0_var, eps = posterior(mixture, x_t, lam, log_weights_fn(cond))
        out = diffusion.output_from_x0_eps(x0, eps, x_t, lam, parameterization)
        if not learned:
            return out
        # Moment-matched variance of q(x_{t-1} | x_t): E over x_0|x_t of the posterior
        # variance plus (its x_0 coefficient)^2 Var[x_0|x_t] (q_posterior, Kingma et al. eq. 31).
        lam_s, lam_t = jnp.reshape(log_snr_of(t - 1), (-1, 1)), jnp.reshape(lam, (-1, 1))
        alpha_s, _ = diffusion.alpha_sigma(lam_s)
        _, post_var, _ = diffusion.q_posterior(x0, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
        log_var = jnp.log(post_var + (alpha_s * -jnp.expm1(lam_t - lam_s)) ** 2 * x0_var)
        if variance_type == "learned":
            return jnp.concatenate([out, log_var], axis=-1)
        lam_next = jnp.reshape(log_snr_of(jnp.minimum(t + 1, schedule.T)), (-1, 1))
        log_small, log_large = diffusion.reverse_log_variance_bounds(
            log_snr_s=lam_s, log_snr_t=lam_t, log_snr_next=lam_next)
        width = log_large - log_small                      # 0 only for a one-step chain (T = 1)
        safe = jnp.where(width > 0, width, 1.0)
        v = jnp.where(width > 0, 2.0 * (log_var - log_small) / safe - 1.0, 0.0)
        return jnp.concatenate([out, jnp.broadcast_to(jnp.clip(v, -1.0, 1.0), out.shape)], axis=-1)

    return apply


def model_fn(mixture: GaussianMixture, parameterization: str = "eps", *,
             schedule: DiscreteSchedule | None = None, log_snr_fn: Callable | None = None,
             variance_type: str = "fixed_small") -> Callable:
    """The exact denoiser as ``model_fn(x_t, t) -> output`` (a perfect network).

    ``t`` has shape [B]: int timesteps 1..T with ``schedule``, float t in [0, 1]
    with ``log_snr_fn``. The output is the exact E[.|x_t] in ``parameterization``;
    for ``learned`` / ``learned_range`` variances the second half of the last
    axis is the log of the moment-matched variance of q(x_{t-1}|x_t), or its
    Nichol & Dhariwal interpolation fraction v (eq. 15) clipped to [-1, 1]
    (bounds from ``diffusion.reverse_log_variance_bounds``, [log beta~_2, log beta_1] at t = 1).
    """
    apply = _build(mixture, parameterization, schedule, log_snr_fn, variance_type, lambda c: None)
    return lambda x_t, t: apply(x_t, t, None)


def conditional_model_fn(mixture: GaussianMixture, parameterization: str = "eps", *,
                         schedule: DiscreteSchedule | None = None, log_snr_fn: Callable | None = None,
                         variance_type: str = "fixed_small") -> Callable:
    """``model_fn(x_t, t, label)``: label k in 0..K-1 is the denoiser of component k alone
    (q(x_0 | k) = N(mu_k, v_k)); the null label K is the whole mixture."""
    K = mixture.weights.shape[0]

    def log_weights(label):
        label = jnp.asarray(label)
        one_hot = jnp.where(label[:, None] == jnp.arange(K), 0.0, -jnp.inf)
        return jnp.where((label == K)[:, None], jnp.log(mixture.weights), one_hot)

    return _build(mixture, parameterization, schedule, log_snr_fn, variance_type, log_weights)


def component_stats(mixture: GaussianMixture, x):
    """Per-component (weights [K], means [K, D], variances [K, D]) of samples x [N, D], each sample
    assigned to its most responsible component at the data level (NumPy, for tests and benchmarks;
    apply the same function to exact samples for the reference values)."""
    x = np.asarray(x, np.float64)
    comp = np.asarray(jnp.argmax(responsibilities(mixture, jnp.asarray(x, jnp.float32)), axis=-1))
    K = mixture.weights.shape[0]
    weights = np.array([np.mean(comp == k) for k in range(K)])
    means = np.stack([x[comp == k].mean(axis=0) if np.any(comp == k) else np.full(x.shape[1], np.nan)
                      for k in range(K)])
    variances = np.stack([x[comp == k].var(axis=0) if np.sum(comp == k) > 1 else np.full(x.shape[1], np.nan)
                          for k in range(K)])
    return weights, means, variances
