"""Continuous time: the VDM loss (Kingma et al. 2021, eqs. 15 and 17) with its exact T-step
bound, and the regression losses at sampled levels (EDM, flow matching, eps / x0 / v)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion
from vdm import schedules
from vdm.losses.likelihoods import (VDM_DECODERS, check_choice, decoder_nll, prior_kl, sum_dims,
                                    vdm_categorical_decoder_log_likelihood)
from vdm.losses.simple import simple_loss

SCHEDULE_GRADIENTS = ("loss", "variance")                  # vdm_loss: what the schedule's interior follows

T_SAMPLINGS = ("uniform", "logit_normal", "log_normal")
T_SAMPLING_DEFAULTS = {"uniform": (0.0, 1.0), "logit_normal": (0.0, 1.0), "log_normal": (-1.2, 1.2)}
T_CLIP = 1e-5  # uniform t is kept in [T_CLIP, 1 - T_CLIP] (Song et al. 2021's eps = 1e-5)


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
    check_choice("decoder", decoder, VDM_DECODERS)
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

    check_choice("schedule_gradient", schedule_gradient, SCHEDULE_GRADIENTS)
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
        return weight * sum_dims(jnp.square(eps - eps_hat))

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
        return prior, -sum_dims(vdm_categorical_decoder_log_likelihood(x0, z_0, lam_0, num_bins))
    alpha_0, _ = diffusion.alpha_sigma(lam_0)
    return prior, decoder_nll(decoder, x0, z_0 / alpha_0, jnp.broadcast_to(-0.5 * lam_0, x0.shape))


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
    check_choice("t_sampling", kind, T_SAMPLINGS)
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
    check_choice("t_sampling", t_sampling, T_SAMPLINGS)
    d_loc, d_scale = T_SAMPLING_DEFAULTS[t_sampling]
    loc, scale = d_loc if loc is None else loc, d_scale if scale is None else scale
    key_t, key_eps = jax.random.split(key)
    t = sample_times(key_t, log_snr_fn, x0.shape[0], t_sampling, loc, scale, u)
    lam = log_snr_fn(t)
    x_t, eps = diffusion.sample_q_xt_given_x0(key_eps, x0, lam, eps)
    out = model_fn(x_t, t)
    return simple_loss(out, x0, eps, x_t, lam, parameterization, sigma_data=sigma_data), {"t": t}
