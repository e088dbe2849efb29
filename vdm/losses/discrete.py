"""Discrete time (Ho et al. 2020; Nichol & Dhariwal 2021): one term of the variational
bound, importance sampling of t, the training loss and the exact and Monte-Carlo ELBO."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion
from vdm import schedules
from vdm.losses.likelihoods import (DECODERS, bits_per_dim, check_choice, decoder_nll, data_dims, gaussian_kl,
                                    prior_kl, sum_dims)
from vdm.losses.simple import check_simple_args, simple_loss

LOSS_KINDS = ("simple", "hybrid", "vlb")


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
    check_choice("decoder", decoder, DECODERS)
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
    kl = sum_dims(gaussian_kl(mean_q, logvar_q, mean_p, logvar_p))
    nll = decoder_nll(decoder, x0, mean_p, 0.5 * logvar_p)
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
    check_choice("decoder", decoder, DECODERS)
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
    check_choice("kind", kind, LOSS_KINDS)
    _check_discrete_args(parameterization, variance_type, decoder, x0)
    if kind != "vlb":
        check_simple_args(parameterization, target, loss_type, weighting, snr_gamma)
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
    num_dims = data_dims(x0)
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
