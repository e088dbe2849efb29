"""Training objectives and likelihood bounds for diffusion models (pure functions).

Discrete time (Ho et al. 2020; Nichol & Dhariwal 2021), paper indexing t = 1..T:

  -ELBO(x_0) = L_T + sum_{t=2}^T L_{t-1} + L_0                      (Ho et al. eq. 5)
  L_T      = KL(q(x_T | x_0) || N(0, I))                              the prior term
  L_{t-1}  = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  t >= 2    a diffusion term
  L_0      = -log p(x_0 | x_1)                                        the decoder

``vlb_term(..., t)`` returns L_{t-1} for t >= 2 and L_0 for t = 1, so
``sum_{t=1}^T vlb_term(t) + prior_kl`` is the whole bound.

Continuous time (Kingma et al. 2021, "Variational Diffusion Models"): the
diffusion loss eq. 17 and its T-step form eq. 15, with the prior term and the
VDM categorical decoder for 8-bit data.

Units: every likelihood quantity is in nats per example (summed over the data
dimensions) unless a name says bits per dimension. The model function is
``model_fn(x_t, t) -> output`` with ``t`` of shape [B] (integer 1..T for the
discrete losses, float in [0, 1] for ``vdm_loss``); close over parameters and
class labels before passing it in.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from vdm import diffusion
from vdm import schedules

LOSS_KINDS = ("simple", "hybrid", "vlb")
LOSS_TYPES = ("l2", "l1")
WEIGHTINGS = ("none", "elbo", "snr", "truncated_snr", "min_snr")
DECODERS = ("discretized", "gaussian")                   # p(x_0 | x_1) of the discrete ELBO
VDM_DECODERS = ("categorical", "discretized", "gaussian")  # p(x | z_0) of vdm_loss
SCHEDULE_GRADIENTS = ("loss", "variance")                  # vdm_loss: what the schedule's interior follows

BIN_WIDTH_8BIT = 2.0 / 255.0  # 8-bit data scaled to [-1, 1]: x = k / 127.5 - 1, k = 0..255
_MIDPOINT_THRESHOLD = 5e-3    # see discretized_gaussian_log_likelihood


def _check_choice(argument: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {tuple(allowed)}, got {value!r}")


def _sum_dims(x):
    """Sum over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _mean_dims(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _num_dims(x) -> int:
    return math.prod(x.shape[1:])


def bits_per_dim(nats, num_dims: int):
    """Convert nats per example into bits per dimension: nats / (num_dims ln 2)."""
    if not isinstance(num_dims, numbers.Integral) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return nats / (num_dims * math.log(2.0))


def dequantized_nats(density_nats, num_dims: int, bin_width: float = BIN_WIDTH_8BIT):
    """A bound on -log P(k) of 8-bit data from -log p(x) of a density on uniformly dequantized
    data x = k + u (u uniform over the bin of width ``bin_width``): by Jensen (Theis et al. 2016;
    Ho et al. 2020 §4.2, Song et al. 2021 App. D.2 add the same constant),

      -log P(k) <= E_u[-log p(k + u)] - D log(bin_width),

    i.e. + D log(127.5) nats for data in [-1, 1] with bin width 2/255. Returns nats."""
    if not isinstance(num_dims, numbers.Integral) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return density_nats - num_dims * math.log(bin_width)


# ---------------------------------------------------------------------------
# Gaussian KL and the prior term.
# ---------------------------------------------------------------------------


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats:

    0.5 (logvar2 - logvar1 + e^{logvar1 - logvar2} - 1 + (mean1 - mean2)^2 e^{-logvar2}),
    with e^d - 1 written expm1(d) so that equal variances give exactly 0.
    """
    d = logvar1 - logvar2
    return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def prior_kl(x0, log_snr_T):
    """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) (Ho et al. eq. 5; Kingma et al. eq. 10),
    summed over the data dimensions: shape [B], nats. ``log_snr_T`` is a scalar or [B]."""
    lam = diffusion._bcast(log_snr_T, x0)
    mean, _ = diffusion.q_xt_given_x0(x0, lam)
    logvar = jnp.broadcast_to(jax.nn.log_sigmoid(-lam), x0.shape)
    return _sum_dims(gaussian_kl(mean, logvar, 0.0, 0.0))


# ---------------------------------------------------------------------------
# Decoders: log p(x_0 | ...) elementwise, in nats.
# ---------------------------------------------------------------------------


def gaussian_log_likelihood(x, mean, log_scale):
    """log N(x; mean, e^{2 log_scale}) elementwise, for continuous (real-valued) data."""
    z = (x - mean) * jnp.exp(-log_scale)
    return -0.5 * (jnp.square(z) + math.log(2.0 * math.pi)) - log_scale


def _log1mexp(d):
    """log(1 - e^d) for d <= 0."""
    return jnp.log(-jnp.expm1(d))


def _log_ndtr_diff(a, b):
    """log(Phi(b) - Phi(a)) for a < b (a may be -inf, b may be +inf), without cancellation.

    Both CDFs are evaluated in the tail where they are small (reflecting the
    interval when its midpoint is positive), and the difference is taken in log
    space: log Phi(hi) + log(1 - Phi(lo)/Phi(hi)).
    """
    flip = a + b > 0
    lo = jnp.where(flip, -b, a)
    hi = jnp.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def discretized_gaussian_log_likelihood(x0, mean, log_scale, bin_width: float = BIN_WIDTH_8BIT):
    """log P(x0) for data on a grid of spacing ``bin_width`` in [-1, 1] (8-bit images:
    2/255) under a Gaussian N(mean, e^{2 log_scale}) integrated over the bin
    (Ho et al. 2020, eq. 13), elementwise, in nats:

      P(x) = Phi((x + w/2 - mean)/scale) - Phi((x - w/2 - mean)/scale),

    where the bin at x = -1 extends to -inf and the bin at x = +1 to +inf.

    Numerics: the CDF difference is computed exactly in log space from
    ``log_ndtr`` in the tail where both CDFs are small, so it stays accurate far
    into the tails (where Ho et al.'s code floors the probability at 1e-12).
    When the bin is narrow relative to the scale (w/2 / scale * max(1, |z|) <
    5e-3) the difference of two nearly equal CDFs would lose float32 digits;
    there we use the midpoint rule P = pdf(z) w / scale, whose relative error
    (w/scale)^2 |z^2 - 1| / 24 is below 1e-5 in that region.
    """
    diffusion._check_same_shape(x0=x0, mean=mean)
    inv_scale = jnp.exp(-log_scale)
    z = (x0 - mean) * inv_scale
    half = 0.5 * bin_width * inv_scale
    lower_edge = x0 < -1.0 + 0.5 * bin_width
    upper_edge = x0 > 1.0 - 0.5 * bin_width
    narrow = (half * jnp.maximum(1.0, jnp.abs(z)) < _MIDPOINT_THRESHOLD) & ~lower_edge & ~upper_edge
    half_safe = jnp.where(narrow, 1.0, half)  # keeps the unused exact branch away from log(0)
    a = jnp.where(lower_edge, -jnp.inf, z - half_safe)
    b = jnp.where(upper_edge, jnp.inf, z + half_safe)
    exact = _log_ndtr_diff(a, b)
    midpoint = -0.5 * (jnp.square(z) + math.log(2.0 * math.pi)) + math.log(bin_width) - log_scale
    return jnp.where(narrow, midpoint, exact)


def vdm_categorical_decoder_log_likelihood(x0, z0, log_snr_0, num_bins: int = 256):
    """log p(x0 | z_0) of the VDM decoder (Kingma et al. 2021, §3.3), elementwise:

      p(x_i = k | z_{0,i}) proportional to q(z_{0,i} | x_i = k) = N(z_{0,i}; alpha_0 v_k, sigma_0^2),

    a softmax over the ``num_bins`` grid values v_k = 2k / (num_bins - 1) - 1 that
    the data take (8-bit data scaled as x / 127.5 - 1). ``x0`` must lie on that
    grid; ``z0`` is a sample of q(z_0 | x0) at level ``log_snr_0`` (scalar or [B]).
    """
    diffusion._check_same_shape(x0=x0, z0=z0)
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    lam = diffusion._bcast(log_snr_0, z0)
    alpha, sigma = diffusion.alpha_sigma(lam)
    grid = jnp.linspace(-1.0, 1.0, num_bins, dtype=z0.dtype)
    logits = -0.5 * jnp.square((z0[..., None] - alpha[..., None] * grid) / sigma[..., None])
    k = jnp.clip(jnp.round((x0 + 1.0) * (num_bins - 1) / 2.0), 0, num_bins - 1).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, k[..., None], axis=-1)[..., 0]


def _decoder_nll(decoder: str, x0, mean, log_scale):
    """-log p(x0 | .) summed over dimensions, for the Gaussian decoders of DECODERS."""
    if decoder == "discretized":
        return -_sum_dims(discretized_gaussian_log_likelihood(x0, mean, log_scale))
    return -_sum_dims(gaussian_log_likelihood(x0, mean, log_scale))


# ---------------------------------------------------------------------------
# Simple (regression) losses.
# ---------------------------------------------------------------------------


def _log_x0_error_factor(target: str, log_snr_t, sigma_data: float = diffusion.EDM_SIGMA_DATA):
    """log c with ||x0 - x0_hat||^2 = c ||y - y_hat||^2 for a prediction y in ``target`` space:
    eps: sigma^2/alpha^2, x0: 1, v: sigma^2, score: sigma^4/alpha^2, flow: sigma^2/(alpha + sigma)^2,
    edm: sigma^2 sd^2 / (sigma^2 + sd^2 alpha^2) = c_out^2 (at fixed x_t)."""
    log_s2, log_a2 = jax.nn.log_sigmoid(-log_snr_t), jax.nn.log_sigmoid(log_snr_t)
    if target == "flow":
        return log_s2 - 2.0 * jnp.log(jnp.exp(0.5 * log_a2) + jnp.exp(0.5 * log_s2))
    if target == "edm":
        return log_s2 + 2.0 * math.log(sigma_data) - jnp.logaddexp(log_s2, 2.0 * math.log(sigma_data) + log_a2)
    return {"eps": -log_snr_t, "x0": jnp.zeros_like(log_snr_t), "v": log_s2,
            "score": 2.0 * log_s2 - log_a2}[target]


def elbo_log_weight(*, log_snr_s, log_snr_t, log_variance=None, log_snr_next=None):
    """log of w in L_{s|t} = w ||x0 - x0_hat||^2, the KL between q(x_s | x_t, x0) and a
    reverse step with the same mean form at x0_hat and variance e^log_variance
    (mean part only; Ho et al. eq. 8; the SNR form is Kingma et al. 2021's discrete-time loss):

      w = alpha_s^2 (1 - SNR_t/SNR_s)^2 / (2 e^log_variance).

    ``log_variance`` defaults to fixed_small's (diffusion.reverse_log_variance_bounds, whose
    value at the step into the data level needs ``log_snr_next``), where w = (SNR_s - SNR_t) / 2
    away from the data level.
    """
    if log_variance is None:
        log_variance, _ = diffusion.reverse_log_variance_bounds(
            log_snr_s=log_snr_s, log_snr_t=log_snr_t, log_snr_next=log_snr_next)
    return (jax.nn.log_sigmoid(log_snr_s) + 2.0 * _log1mexp(log_snr_t - log_snr_s)
            - math.log(2.0) - log_variance)


def _check_simple_args(parameterization, target, loss_type, weighting, snr_gamma) -> str:
    """Validate simple_loss's options; returns the target (default: the parameterization)."""
    diffusion.check_parameterization(parameterization)
    target = parameterization if target is None else target
    _check_choice("target", target, diffusion.PARAMETERIZATIONS)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("weighting", weighting, WEIGHTINGS)
    if loss_type == "l1" and weighting != "none":
        raise ValueError(f"weighting {weighting!r} is defined for loss_type 'l2'; "
                         f"loss_type 'l1' allows weighting 'none'")
    if weighting == "min_snr" and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma!r}")
    return target


def simple_loss(output, x0, eps, x_t, log_snr_t, parameterization: str, target: str | None = None,
                loss_type: str = "l2", weighting: str = "none", snr_gamma: float = 5.0, *,
                log_snr_s=None, log_variance=None, sigma_data: float = diffusion.EDM_SIGMA_DATA):
    """Regression loss on the prediction, mean over data dimensions: shape [B].

    ``output`` (the model's prediction part, x_t's shape) is read in
    ``parameterization`` and compared in ``target`` space (default: the same),
    with the target computed from the true (x0, eps). L2 (Ho et al. L_simple,
    eq. 14) or L1. ``weighting`` multiplies the per-example L2 loss so that it
    equals w(lambda_t) * mean ||x0 - x0_hat||^2 with
      none:           1 (no reweighting: plain MSE in target space),
      snr:            SNR_t (Kingma et al. 2021; SNR times x0-MSE = eps-MSE),
      truncated_snr:  max(SNR_t, 1) (Salimans & Ho 2022, §4),
      min_snr:        min(SNR_t, snr_gamma) (Hang et al. 2023),
      elbo:           the KL weight of ``elbo_log_weight(log_snr_s=, log_snr_t=, log_variance=)``;
                      then num_dims * loss = L_{t-1} of ``vlb_term`` (t >= 2) up to a
                      model-independent constant, exactly for fixed_small; pass the model's
                      fixed log-variance (``discrete_loss`` does, from the schedule's tables;
                      the default, fixed_small's, falls back to sigma_{t|0}^2 into the data
                      level). Needs ``log_snr_s`` (the previous level).
    Reweighting is defined for L2 only; l1 takes weighting "none". ``sigma_data`` is the "edm"
    parameterization's; with target "edm" and weighting "none" this is the EDM loss (Karras et al.
    2022, eq. 8 with lambda(sigma) = 1 / c_out^2), with target "flow" the conditional
    flow-matching loss ||u_hat - (eps - x0)||^2 (Lipman et al. 2023, eq. 23).
    """
    target = _check_simple_args(parameterization, target, loss_type, weighting, snr_gamma)
    if weighting == "elbo" and log_snr_s is None:
        raise ValueError("weighting 'elbo' needs log_snr_s, the log-SNR of the previous level")
    diffusion._check_same_shape(output=output, x0=x0, eps=eps, x_t=x_t)

    pred = diffusion.convert(output, x_t, log_snr_t, parameterization, target, sigma_data)
    true = diffusion.output_from_x0_eps(x0, eps, x_t, log_snr_t, target, sigma_data)
    err = pred - true
    per_example = _mean_dims(jnp.square(err) if loss_type == "l2" else jnp.abs(err))
    if weighting == "none":
        return per_example
    lam = jnp.asarray(log_snr_t, per_example.dtype)
    log_w = {
        "snr": lambda: lam,
        "truncated_snr": lambda: jnp.maximum(lam, 0.0),
        "min_snr": lambda: jnp.minimum(lam, math.log(snr_gamma)),
        "elbo": lambda: elbo_log_weight(log_snr_s=log_snr_s, log_snr_t=lam, log_variance=log_variance),
    }[weighting]()
    return jnp.exp(log_w + _log_x0_error_factor(target, lam, sigma_data)) * per_example


# ---------------------------------------------------------------------------
# The variational bound, one term at a time.
# ---------------------------------------------------------------------------


def vlb_term(output, x0, x_t, t, schedule: schedules.DiscreteSchedule, parameterization: str,
             variance_type: str, decoder: str = "discretized", *, stop_grad_mean: bool = False):
    """The VLB term at integer timesteps t (shape [B], values 1..T), in nats per example [B]:

      t >= 2:  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (Ho et al. eq. 5)
      t =  1:  L_0     = -log p(x_0 | x_1), the ``decoder``:
               "discretized" (8-bit data, Ho et al. eq. 13) or "gaussian" (real-valued data).

    The reverse step comes from ``diffusion.p_mean_variance`` with any variance
    type: fixed_small, fixed_large, learned_range (Nichol & Dhariwal eq. 15) or
    a free learned log-variance, with the schedule's stored tables for the posterior
    coefficients and variance bounds (``schedules.reverse_step_tables``). At t = 1 the
    decoder's variance follows improved-diffusion (and Ho et al.'s code): beta~_2 for
    fixed_small and fixed_large, learned_range between log beta~_2 and log beta_1.
    ``stop_grad_mean`` stops the gradient through the mean prediction so that this
    term trains only the variance (the L_vlb part of Nichol & Dhariwal's hybrid
    loss, §3.1).
    """
    diffusion.check_parameterization(parameterization)
    diffusion.check_variance_type(variance_type)
    _check_choice("decoder", decoder, DECODERS)
    diffusion._check_same_shape(x0=x0, x_t=x_t)
    schedules.check_timesteps(t, schedule.T)
    t = jnp.asarray(t)
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [B] = {x0.shape[:1]}, got {t.shape}")
    pred, var_out = diffusion.split_variance_output(output, variance_type)
    if pred.shape != x0.shape:
        raise ValueError(f"output must have x0's shape {x0.shape} (last axis doubled for variance "
                         f"type {variance_type!r}), got {output.shape}")
    if stop_grad_mean:
        pred = jax.lax.stop_gradient(pred)
    if var_out is not None:
        pred = jnp.concatenate([pred, var_out], axis=-1)
    lam_s, lam_t = schedule.log_snr[t - 1], schedule.log_snr[t]
    tables = schedules.reverse_step_tables(schedule, t)
    mean_p, logvar_p, _ = diffusion.p_mean_variance(pred, x_t, parameterization, variance_type,
                                                    log_snr_s=lam_s, log_snr_t=lam_t, tables=tables)
    mean_q = diffusion._bcast(tables.coef_x0, x0) * x0 + diffusion._bcast(tables.coef_xt, x0) * x_t
    # log beta~_t for t >= 2; the t = 1 posterior is a point mass (no KL, the decoder instead).
    logvar_q = jnp.broadcast_to(diffusion._bcast(tables.log_var_min, x0), x0.shape)
    kl = _sum_dims(gaussian_kl(mean_q, logvar_q, mean_p, logvar_p))
    nll = _decoder_nll(decoder, x0, mean_p, 0.5 * logvar_p)
    return jnp.where(t == 1, nll, kl)


# ---------------------------------------------------------------------------
# Importance sampling of t from a loss history (Nichol & Dhariwal 2021, §3.3).
# ---------------------------------------------------------------------------


class LossHistory(NamedTuple):
    """The last ``history`` values of the VLB term per timestep: row t - 1 holds timestep t."""

    losses: jax.Array  # [T, history] float32, a ring buffer per timestep
    counts: jax.Array  # [T] int32, values seen per timestep


def loss_history_init(T: int, history: int = 10) -> LossHistory:
    """An empty loss history for timesteps 1..T (Nichol & Dhariwal keep 10 values per t)."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be an integer >= 1, got {history!r}")
    return LossHistory(jnp.zeros((T, history), jnp.float32), jnp.zeros((T,), jnp.int32))


def loss_history_update(state: LossHistory, t, losses) -> LossHistory:
    """Record losses[i] for timestep t[i] (in order; repeated timesteps each count)."""
    T, history = state.losses.shape

    def push(s, tl):
        ti, li = tl
        row = ti - 1
        buf = s.losses.at[row, s.counts[row] % history].set(li)
        return LossHistory(buf, s.counts.at[row].add(1)), None

    state, _ = jax.lax.scan(push, state, (jnp.asarray(t, jnp.int32),
                                          jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32))))
    return state


def loss_history_probs(state: LossHistory, uniform_prob: float = 1e-3):
    """p(t) for t = 1..T, shape [T]: proportional to sqrt(E[L_t^2]) over the history,
    mixed with uniform_prob of the uniform distribution (Nichol & Dhariwal §3.3 and their
    code); uniform until every timestep has a full history."""
    T, history = state.losses.shape
    rms = jnp.sqrt(jnp.mean(jnp.square(state.losses), axis=1))
    p = rms / jnp.sum(rms)
    p = (1.0 - uniform_prob) * p + uniform_prob / T
    warm = jnp.all(state.counts >= history)
    return jnp.where(warm, p, jnp.full((T,), 1.0 / T))


def loss_history_sample(state: LossHistory, key, batch: int):
    """Sample ``batch`` timesteps t ~ p(t) (``loss_history_probs``) and their importance
    weights 1 / (T p(t)), so that E[weight * L_t] = mean_t L_t. Returns (t int32 [batch],
    weights float32 [batch])."""
    p = loss_history_probs(state)
    T = p.shape[0]
    idx = jax.random.categorical(key, jnp.log(p), shape=(batch,))
    return (idx + 1).astype(jnp.int32), 1.0 / (T * p[idx])


# ---------------------------------------------------------------------------
# Discrete-time training loss.
# ---------------------------------------------------------------------------


def _check_discrete_args(parameterization, variance_type, decoder, x0):
    diffusion.check_parameterization(parameterization)
    diffusion.check_variance_type(variance_type)
    _check_choice("decoder", decoder, DECODERS)
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must have shape [B, ...] with at least one data axis, got {jnp.shape(x0)}")


def discrete_loss(model_fn: Callable, key, x0, schedule: schedules.DiscreteSchedule, *,
                  kind: str = "simple", parameterization: str = "eps",
                  variance_type: str = "fixed_small", loss_type: str = "l2",
                  weighting: str = "none", target: str | None = None, snr_gamma: float = 5.0,
                  hybrid_lambda: float = 1e-3, decoder: str = "discretized", t=None, weights=None,
                  eps=None):
    """One Monte-Carlo sample of the discrete-time training loss per example.

    t ~ U{1..T} (or the given timesteps ``t`` with importance ``weights``, e.g. from
    ``loss_history_sample``), x_t ~ q(x_t | x_0), output = model_fn(x_t, t). ``kind``:
      simple: ``simple_loss`` (Ho et al. eq. 14 and its weightings);
      hybrid: simple + hybrid_lambda * L_vlb with the mean's gradient stopped in L_vlb
              (Nichol & Dhariwal §3.1, lambda = 1e-3); L_vlb = T * vlb_term in bits per
              dimension, as in their code, estimates the whole bound sum_t L_t;
      vlb:    (prior_kl + T * vlb_term) in bits per dimension, an unbiased estimate of the
              -ELBO (use importance-sampled t to reduce its variance, §3.3).
    ``eps`` (x0's shape), if given, is the noise of x_t instead of a draw from ``key``
    (the training loop draws t and eps per example so that results do not depend on
    how the batch is split over devices).
    The per-example loss is multiplied by ``weights`` (default 1). Returns (loss [B],
    metrics) with metrics t [B], vlb_term [B] (nats, no gradient; feed it to
    ``loss_history_update``) and simple [B] when computed.
    """
    _check_choice("kind", kind, LOSS_KINDS)
    _check_discrete_args(parameterization, variance_type, decoder, x0)
    if kind != "vlb":
        _check_simple_args(parameterization, target, loss_type, weighting, snr_gamma)
    if kind == "simple" and diffusion.learns_variance(variance_type):
        raise ValueError(f"kind 'simple' does not train the variance of variance_type "
                         f"{variance_type!r}; use kind 'hybrid' or 'vlb', or variance_type "
                         f"'fixed_small' or 'fixed_large'")
    B, T = x0.shape[0], schedule.T
    key_t, key_eps = jax.random.split(key)
    if t is None:
        if weights is not None:
            raise ValueError("weights need the timesteps t they belong to")
        t = jax.random.randint(key_t, (B,), 1, T + 1)
    else:
        schedules.check_timesteps(t, T)
        if jnp.shape(t) != (B,):
            raise ValueError(f"t must have shape [B] = ({B},), got {jnp.shape(t)}")
    if weights is not None and jnp.shape(weights) != (B,):
        raise ValueError(f"weights must have shape [B] = ({B},), got {jnp.shape(weights)}")
    t = jnp.asarray(t, jnp.int32)

    lam_s, lam_t = schedule.log_snr[t - 1], schedule.log_snr[t]
    x_t, eps = diffusion.sample_q_xt_given_x0(key_eps, x0, lam_t, eps)
    output = model_fn(x_t, t)
    pred, _ = diffusion.split_variance_output(output, variance_type)
    metrics = {"t": t}
    term = vlb_term(output, x0, x_t, t, schedule, parameterization, variance_type, decoder,
                    stop_grad_mean=(kind == "hybrid"))
    metrics["vlb_term"] = jax.lax.stop_gradient(term)
    num_dims = _num_dims(x0)
    if kind == "vlb":
        loss = bits_per_dim(prior_kl(x0, schedule.log_snr[T]) + T * term, num_dims)
    else:
        log_variance = None
        if variance_type in ("fixed_small", "fixed_large"):
            tables = schedules.reverse_step_tables(schedule, t)
            log_variance = diffusion.fixed_log_variance(variance_type, tables.log_var_min,
                                                        tables.log_var_max, lam_s)
        simple = simple_loss(pred, x0, eps, x_t, lam_t, parameterization, target, loss_type,
                             weighting, snr_gamma, log_snr_s=lam_s, log_variance=log_variance)
        metrics["simple"] = simple
        loss = simple if kind == "simple" else simple + hybrid_lambda * bits_per_dim(T * term, num_dims)
    if weights is not None:
        loss = loss * weights
    return loss, metrics


# ---------------------------------------------------------------------------
# The discrete ELBO: exact sum over all T terms, and its Monte-Carlo estimate.
# ---------------------------------------------------------------------------


def discrete_elbo(model_fn: Callable, key, x0, schedule: schedules.DiscreteSchedule, *,
                  parameterization: str = "eps", variance_type: str = "fixed_small",
                  decoder: str = "discretized", chunk: int = 1):
    """-ELBO(x_0) with every one of its T + 1 terms (Ho et al. eq. 5), nats per example.

    Each term draws its own x_t ~ q(x_t | x_0) (key folded with t). The T terms are
    evaluated ``chunk`` timesteps at a time (one model call on chunk * B inputs) in a
    ``lax.map``, so memory does not grow with T. Returns a dict of
      prior [B]:        L_T = KL(q(x_T | x_0) || N(0, I)),
      diffusion [B, T]: column t - 1 holds L_{t-1} for t = 2..T; column 0 is 0,
      decoder [B]:      L_0 = -log p(x_0 | x_1),
      total [B]:        prior + diffusion.sum(-1) + decoder.
    """
    _check_discrete_args(parameterization, variance_type, decoder, x0)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    B, T = x0.shape[0], schedule.T
    chunk = min(chunk, T)
    n_chunks = -(-T // chunk)
    ts = jnp.minimum(jnp.arange(1, n_chunks * chunk + 1, dtype=jnp.int32), T).reshape(n_chunks, chunk)

    def terms_at(tc):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, tc)
        eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape, x0.dtype))(keys)
        t_flat = jnp.repeat(tc, B)
        x0_flat = jnp.broadcast_to(x0, (chunk,) + x0.shape).reshape((chunk * B,) + x0.shape[1:])
        x_t, _ = diffusion.sample_q_xt_given_x0(None, x0_flat, schedule.log_snr[t_flat],
                                                eps.reshape(x0_flat.shape))
        out = model_fn(x_t, t_flat)
        return vlb_term(out, x0_flat, x_t, t_flat, schedule, parameterization, variance_type,
                        decoder).reshape(chunk, B)

    terms = jax.lax.map(terms_at, ts).reshape(n_chunks * chunk, B)[:T].T  # [B, T]
    prior = prior_kl(x0, schedule.log_snr[T])
    decoder_nll = terms[:, 0]
    diff = terms.at[:, 0].set(0.0)
    return dict(prior=prior, diffusion=diff, decoder=decoder_nll,
                total=prior + jnp.sum(diff, axis=1) + decoder_nll)


def discrete_elbo_mc(model_fn: Callable, key, x0, schedule: schedules.DiscreteSchedule,
                     num_samples: int, *, parameterization: str = "eps",
                     variance_type: str = "fixed_small", decoder: str = "discretized",
                     importance=None):
    """Unbiased Monte-Carlo estimate of -ELBO(x_0) (nats per example) from ``num_samples``
    timesteps per example: prior + mean_k L_{t_k - 1} / p(t_k), t_k ~ p.

    p is uniform (importance=None) or the given probabilities over t = 1..T, shape [T]
    (e.g. ``loss_history_probs``; Nichol & Dhariwal §3.3), positive everywhere: a zero
    probability is a ValueError (traced probabilities with a zero give a NaN total). Returns a dict of total [B]
    (the estimate), stderr [B] (its standard error over the samples), prior [B] and
    samples [num_samples, B] (the per-sample estimates of sum_t L_{t-1}).
    """
    _check_discrete_args(parameterization, variance_type, decoder, x0)
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (for the standard error), "
                         f"got {num_samples!r}")
    B, T = x0.shape[0], schedule.T
    if importance is None:
        p = jnp.full((T,), 1.0 / T, jnp.float32)
    else:
        p = jnp.asarray(importance, jnp.float32)
        if p.shape != (T,):
            raise ValueError(f"importance must be probabilities over t = 1..T, shape ({T},), "
                             f"got {p.shape}")
        if not isinstance(importance, jax.core.Tracer) and not np.all(np.asarray(importance) > 0):
            raise ValueError("importance must be positive at every t = 1..T (a zero leaves those "
                             "terms out of the estimate and biases it); mix in a uniform "
                             "distribution as loss_history_probs does")
        p = p / jnp.sum(p)

    def one(k):
        k_t, k_eps = jax.random.split(k)
        t = jax.random.categorical(k_t, jnp.log(p), shape=(B,)).astype(jnp.int32) + 1
        x_t, _ = diffusion.sample_q_xt_given_x0(k_eps, x0, schedule.log_snr[t])
        term = vlb_term(model_fn(x_t, t), x0, x_t, t, schedule, parameterization,
                        variance_type, decoder)
        return term / p[t - 1]

    samples = jax.lax.map(one, jax.random.split(key, num_samples))  # [num_samples, B]
    prior = prior_kl(x0, schedule.log_snr[T])
    stderr = jnp.std(samples, axis=0, ddof=1) / math.sqrt(num_samples)
    total = jnp.where(jnp.all(p > 0), prior + jnp.mean(samples, axis=0), jnp.nan)
    return dict(total=total, stderr=stderr, prior=prior,
                samples=samples)


# ---------------------------------------------------------------------------
# The VDM loss (Kingma et al. 2021): continuous time and its T-step form.
# ---------------------------------------------------------------------------


def vdm_loss(model_fn: Callable, log_snr_fn: Callable, key, x0, *, T: int = 0,
             antithetic: bool = True, parameterization: str = "eps",
             decoder: str = "categorical", num_bins: int = 256, u=None, eps=None, eps_0=None,
             schedule_gradient: str = "loss", shape_log_snr_fn: Callable | None = None):
    """-ELBO of a VDM (Kingma et al. 2021, eqs. 10-11), one Monte-Carlo sample per example,
    in nats: prior + diffusion + decoder, each [B].

    ``log_snr_fn(t)`` maps t in [0, 1] (elementwise) to lambda(t) = -gamma(t); it may close
    over learned schedule parameters, through which gradients flow. ``model_fn(z_t, t)``
    gets the continuous t [B] and predicts in ``parameterization``.
      diffusion, T = 0 (eq. 17): 0.5 * (-dlambda/dt) * ||eps - eps_hat(z_t; t)||^2, t ~ U(0, 1);
      diffusion, T > 0 (eq. 15, written in eps): 0.5 T expm1(lambda_s - lambda_t) ||eps - eps_hat||^2
                 with t = i/T, s = (i - 1)/T, i ~ U{1..T};
      prior:     KL(q(z_1 | x) || N(0, I)) at lambda(1);
      decoder:   -log p(x | z_0), z_0 ~ q(z_0 | x): "categorical" (8-bit data, §3.3),
                 "discretized" (Ho et al. eq. 13 at mean z_0/alpha_0, scale sigma_0/alpha_0)
                 or "gaussian" (real-valued data, N(z_0/alpha_0, sigma_0^2/alpha_0^2)).
    ``antithetic`` spreads the batch's times evenly: t_i = (u + i/B) mod 1, u ~ U(0, 1)
    (Kingma et al.'s low-discrepancy sampler; an unbiased, lower-variance estimate).
    Given ``u`` (uniform numbers in [0, 1), [B]) replaces that draw, and ``eps`` / ``eps_0``
    (x0's shape) the noise of z_t / z_0 (the training loop draws them per example).
    ``schedule_gradient`` = "variance" changes the gradient, not the value: the schedule's
    interior gets the variance-minimizing gradient of Kingma et al. §5.2 (see
    ``_interior_variance_gradient``), its endpoints and the model the gradient of the loss;
    ``shape_log_snr_fn`` is then the same schedule with its endpoint parameters held fixed
    (stop_gradient), from which the interior shape is computed (default: log_snr_fn).
    Returns (total [B], metrics) with metrics prior, diffusion, decoder and t, each [B].
    """
    diffusion.check_parameterization(parameterization)
    _check_choice("decoder", decoder, VDM_DECODERS)
    if not isinstance(T, int) or isinstance(T, bool) or T < 0:
        raise ValueError(f"T must be 0 (continuous time) or a positive integer, got {T!r}")
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must have shape [B, ...] with at least one data axis, got {jnp.shape(x0)}")
    B = x0.shape[0]
    key_t, key_eps, key_0 = jax.random.split(key, 3)
    if u is not None:
        if jnp.shape(u) != (B,):
            raise ValueError(f"u must have shape [B] = ({B},), got {jnp.shape(u)}")
        u = jnp.asarray(u, jnp.float32)
    elif antithetic:
        u = jnp.mod(jax.random.uniform(key_t, ()) + jnp.arange(B) / B, 1.0)
    else:
        u = jax.random.uniform(key_t, (B,))

    _check_choice("schedule_gradient", schedule_gradient, SCHEDULE_GRADIENTS)
    if eps is None:
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    if T == 0:
        t, s = u, None
    else:
        i = jnp.clip(jnp.ceil(u * T), 1, T)
        t, s = i / T, (i - 1) / T

    def diffusion_term(lam_t, weight):
        z_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam_t, eps)
        _, eps_hat = diffusion.x0_eps_from_output(model_fn(z_t, t), z_t, lam_t, parameterization)
        return weight * _sum_dims(jnp.square(eps - eps_hat))

    if schedule_gradient == "loss":
        diff = diffusion_term(*_vdm_level_and_weight(log_snr_fn, t, s, T))
    else:
        diff = _interior_variance_gradient(log_snr_fn, shape_log_snr_fn or log_snr_fn, t, s, T,
                                           diffusion_term)
    prior, dec = _vdm_prior_and_decoder(log_snr_fn, key_0, x0, decoder, num_bins, eps_0)
    return prior + diff + dec, dict(prior=prior, diffusion=diff, decoder=dec, t=t)


def _vdm_level_and_weight(log_snr_fn: Callable, t, s, T: int):
    """(lambda(t), w) with the diffusion term w ||eps - eps_hat||^2: w = -0.5 dlambda/dt
    (eq. 17, T = 0) or, for t = i/T and s = (i - 1)/T, w = 0.5 T expm1(lambda(s) - lambda(t))
    (eq. 15)."""
    if T == 0:
        lam_t, dlam_dt = schedules.log_snr_and_derivative(log_snr_fn, t)
        return lam_t, -0.5 * dlam_dt
    lam_t = log_snr_fn(t)
    return lam_t, 0.5 * T * jnp.expm1(log_snr_fn(s) - lam_t)


def _vdm_prior_and_decoder(log_snr_fn: Callable, key_0, x0, decoder: str, num_bins: int, eps_0=None):
    """(prior [B], decoder [B]) of the VDM bound: KL(q(z_1 | x) || N(0, I)) and -log p(x | z_0)
    at one draw z_0 ~ q(z_0 | x) (eps_0 if given), in nats."""
    prior = prior_kl(x0, log_snr_fn(jnp.float32(1.0)))
    lam_0 = log_snr_fn(jnp.float32(0.0))
    z_0, _ = diffusion.sample_q_xt_given_x0(key_0, x0, lam_0, eps_0)
    if decoder == "categorical":
        return prior, -_sum_dims(vdm_categorical_decoder_log_likelihood(x0, z_0, lam_0, num_bins))
    alpha_0, _ = diffusion.alpha_sigma(lam_0)
    return prior, _decoder_nll(decoder, x0, z_0 / alpha_0, jnp.broadcast_to(-0.5 * lam_0, x0.shape))


def _interior_variance_gradient(log_snr_fn: Callable, shape_log_snr_fn: Callable, t, s, T: int,
                                diffusion_term: Callable):
    """The diffusion term diffusion_term(lambda(t), w) [B] with the variance-minimizing schedule
    gradient of Kingma et al. 2021 (§5.2, App. I.2).

    Write lambda(t) = lambda(0) - (lambda(0) - lambda(1)) f(t): the endpoints lambda(0),
    lambda(1) and the interior shape f (0 at t = 0, 1 at t = 1). In continuous time the
    expected loss depends on the endpoints only, so f is trained to minimise the variance of
    the estimate, d/df E[L^2] = E[2 L dL/df]: the cotangent reaching f(t_i) (and f'(t_i), or
    f(s_i) in T-step form) is multiplied by 2 L_i, L_i example i's diffusion term. The
    endpoints and everything diffusion_term closes over (the model) get the ordinary gradient,
    and the value is the same as without it. (The public google-research/vdm code has no such
    gradient; this follows the paper's description.)

    f is computed from ``shape_log_snr_fn``, the schedule with its endpoint parameters held fixed:
    f does not depend on them, but computed from log_snr_fn its zero derivative with respect
    to them is float32 cancellation, which the factor 2 L would amplify.
    """
    lam0, lam1 = log_snr_fn(jnp.float32(0.0)), log_snr_fn(jnp.float32(1.0))
    span = lam0 - lam1
    fixed0, fixed1 = shape_log_snr_fn(jnp.float32(0.0)), shape_log_snr_fn(jnp.float32(1.0))
    shape = lambda s: (fixed0 - shape_log_snr_fn(s)) / (fixed0 - fixed1)
    if T == 0:
        f_t, df_dt = schedules.log_snr_and_derivative(shape, t)

        def term(f_t, df_dt):
            return diffusion_term(lam0 - span * f_t, 0.5 * span * df_dt)

        return _square_scaled_gradient(term, f_t, df_dt)

    def term(f_t, f_s):
        lam_t = lam0 - span * f_t
        return diffusion_term(lam_t, 0.5 * T * jnp.expm1(span * (f_t - f_s)))

    return _square_scaled_gradient(term, shape(t), shape(s))


def _square_scaled_gradient(fn: Callable, *xs):
    """fn(*xs) -> L [B], where each x in xs is [B] and x_i enters L_i only. The value is
    fn(*xs). Backward, the cotangent g of L reaches the values fn closes over unchanged and
    reaches each x as 2 L_i g_i dL_i/dx_i: the gradient of sum_i g_i L_i^2 instead of
    sum_i g_i L_i. (closure_convert makes the closed-over tracers explicit arguments.)"""
    converted, consts = jax.closure_convert(fn, *xs)
    return _scaled_call(converted, len(xs), *xs, *consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scaled_call(fn, n, *args):
    return fn(*args)


def _scaled_call_fwd(fn, n, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, (out, vjp)


def _scaled_call_bwd(fn, n, res, g):
    out, vjp = res
    grads = vjp(g)
    return tuple(2.0 * out * gr if i < n else gr for i, gr in enumerate(grads))


_scaled_call.defvjp(_scaled_call_fwd, _scaled_call_bwd)


def vdm_elbo_exact(model_fn: Callable, log_snr_fn: Callable, key, x0, T: int, *, chunk: int = 1,
                   parameterization: str = "eps", decoder: str = "categorical", num_bins: int = 256):
    """-ELBO of the T-step VDM (Kingma et al. 2021, eq. 15) with all T diffusion terms summed,
    nats per example: prior + sum_{i=1}^T L_i + decoder with

        L_i = 0.5 expm1(lambda((i - 1)/T) - lambda(i/T)) ||eps_i - eps_hat(z_{i/T}; i/T)||^2,

    one eps_i per term (key folded with i) and one z_0 draw for the decoder. It bounds the
    continuous-time model's likelihood from below for any T (L_T >= L_inf, §4.1) and removes
    the Monte-Carlo noise over t. The terms run ``chunk`` at a time (one model call on
    chunk * B inputs) in a ``lax.map``. Returns prior, diffusion (sum), decoder, total, each [B].
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    B = x0.shape[0]
    chunk = min(chunk, T)
    n_chunks = -(-T // chunk)
    steps = jnp.minimum(jnp.arange(1, n_chunks * chunk + 1, dtype=jnp.int32), T).reshape(n_chunks, chunk)
    flat = lambda a: a.reshape((chunk * B,) + x0.shape[1:])

    def terms_at(ic):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ic)
        eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape, x0.dtype))(keys)
        u = jnp.repeat((ic.astype(jnp.float32) - 0.5) / T, B)
        _, m = vdm_loss(model_fn, log_snr_fn, key, flat(jnp.broadcast_to(x0, (chunk,) + x0.shape)), T=T,
                        u=u, eps=flat(eps), parameterization=parameterization, decoder=decoder,
                        num_bins=num_bins)
        return m["diffusion"].reshape(chunk, B) / T

    diff = jnp.sum(jax.lax.map(terms_at, steps).reshape(n_chunks * chunk, B)[:T], axis=0)
    prior, dec = _vdm_prior_and_decoder(log_snr_fn, jax.random.fold_in(key, 0), x0, decoder, num_bins)
    return dict(prior=prior, diffusion=diff, decoder=dec, total=prior + diff + dec)


# ---------------------------------------------------------------------------
# Continuous-time regression losses: EDM, flow matching, eps/x0/v at sampled levels.
# ---------------------------------------------------------------------------

T_SAMPLINGS = ("uniform", "logit_normal", "log_normal")
T_SAMPLING_DEFAULTS = {"uniform": (0.0, 1.0), "logit_normal": (0.0, 1.0), "log_normal": (-1.2, 1.2)}
T_CLIP = 1e-5  # uniform t is kept in [T_CLIP, 1 - T_CLIP] (Song et al. 2021's eps = 1e-5)


def clipped_time(u):
    """u in [0, 1] -> t = T_CLIP + (1 - 2 T_CLIP) u in [T_CLIP, 1 - T_CLIP]."""
    return T_CLIP + (1.0 - 2.0 * T_CLIP) * u


def sample_times(key, log_snr_fn: Callable, batch: int, kind: str = "uniform",
                 loc: float = 0.0, scale: float = 1.0, u=None):
    """Training times t [B] in (0, 1) of a continuous schedule:

      uniform       t ~ U(T_CLIP, 1 - T_CLIP);
      logit_normal  t = sigmoid(loc + scale n), n ~ N(0, 1) (Esser et al. 2024, §3.1; loc 0, scale 1);
      log_normal    sigma_ve = exp(loc + scale n) (Karras et al. 2022, P_mean = -1.2, P_std = 1.2),
                    lambda = -2 log sigma_ve, t = log_snr_fn^{-1}(lambda) by bisection.

    On the "flow" schedule (log-SNR = -2 logit t) logit-normal t is a normal log-SNR with mean
    -2 loc and standard deviation 2 scale, and log-normal sigma one with mean -2 loc and standard
    deviation 2 scale: the two papers' choices are the same family. ``u`` [B] (uniform numbers)
    replaces the draw of the uniform / normal variate (through its inverse CDF).
    """
    _check_choice("t_sampling", kind, T_SAMPLINGS)
    if not scale > 0:
        raise ValueError(f"scale of the {kind} time distribution must be > 0, got {scale!r}")
    if u is None:
        u = jax.random.uniform(key, (batch,))
    if kind == "uniform":
        return clipped_time(u)
    n = jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
    if kind == "logit_normal":
        return jax.nn.sigmoid(loc + scale * n)
    return schedules.invert_log_snr(log_snr_fn, -2.0 * (loc + scale * n))


def continuous_simple_loss(model_fn: Callable, log_snr_fn: Callable, key, x0, *,
                           parameterization: str = "eps", t_sampling: str = "uniform",
                           loc: float | None = None, scale: float | None = None,
                           sigma_data: float = diffusion.EDM_SIGMA_DATA, u=None, eps=None):
    """Per-example unweighted MSE in the network's own parameterization at levels t drawn by
    ``sample_times``: mean over dims of ||output - target(x0, eps)||^2, shape [B] (``simple_loss``):

      edm  + log_normal:   the EDM loss, Karras et al. 2022 eq. 8 / Table 1 (lambda c_out^2 = 1);
      flow + uniform or logit_normal on the "flow" schedule: conditional flow matching
           (Lipman et al. 2023 eq. 23; Liu et al. 2023; Esser et al. 2024 §3.1);
      eps / x0 / v:        Ho et al.'s L_simple in continuous time.

    ``loc`` / ``scale`` default to T_SAMPLING_DEFAULTS. ``u`` [B] and ``eps`` (x0's shape)
    replace the draws of the time variate and the noise. Returns (loss [B], {"t": t}).
    """
    diffusion.check_parameterization(parameterization)
    _check_choice("t_sampling", t_sampling, T_SAMPLINGS)
    d_loc, d_scale = T_SAMPLING_DEFAULTS[t_sampling]
    loc, scale = d_loc if loc is None else loc, d_scale if scale is None else scale
    key_t, key_eps = jax.random.split(key)
    t = sample_times(key_t, log_snr_fn, x0.shape[0], t_sampling, loc, scale, u)
    lam = log_snr_fn(t)
    x_t, eps = diffusion.sample_q_xt_given_x0(key_eps, x0, lam, eps)
    out = model_fn(x_t, t)
    return simple_loss(out, x0, eps, x_t, lam, parameterization, sigma_data=sigma_data), {"t": t}
