"""The Gaussian forward process and its posteriors, in terms of log-SNR.

Every level is given by its log signal-to-noise ratio lambda = log(alpha^2 /
sigma^2) with alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (variance
preserving). A discrete schedule supplies ``schedule.log_snr[t]``, a
continuous one ``log_snr_fn(t)``; the same functions then serve DDPM (s = t-1),
strided samplers (DDIM, respacing) and continuous time (Kingma et al. 2021, App. A).

Quantities that would cancel in float32 (1 - alpha_{t|s}^2, the posterior
variance) are written with expm1 of a log-SNR difference.

Level arrays (``log_snr``) are either scalars or have shape [B] for a batch
x of shape [B, ...]; they broadcast over the remaining axes of x.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("eps", "x0", "v", "score", "flow", "edm")
EDM_SIGMA_DATA = 0.5  # Karras et al. 2022, Table 1 (images in [-1, 1])


def _bcast(a, x):
    """Reshape a level array of shape [B] (or []) to broadcast against x of shape [B, ...]."""
    a = jnp.asarray(a)
    if a.ndim == x.ndim and all(d in (1, n) for d, n in zip(a.shape, x.shape)):
        return a  # already broadcast
    if a.ndim > x.ndim or x.shape[: a.ndim] != a.shape:
        raise ValueError(f"level array of shape {a.shape} does not match the leading axes of x {x.shape}")
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _check_same_shape(**arrays):
    shapes = {k: jnp.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays must have the same shape, got {shapes}")


def alpha_sigma(log_snr):
    """(alpha, sigma) with alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


# ---------------------------------------------------------------------------
# Forward process.
# ---------------------------------------------------------------------------


def q_xt_given_x0(x0, log_snr_t):
    """q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (Ho et al. eq. 4). Returns (mean, variance)."""
    lam = _bcast(log_snr_t, x0)
    alpha, _ = alpha_sigma(lam)
    return alpha * x0, jnp.broadcast_to(jax.nn.sigmoid(-lam), x0.shape)


def sample_q_xt_given_x0(key, x0, log_snr_t, eps=None):
    """x_t = alpha_t x_0 + sigma_t eps. Returns (x_t, eps); eps is drawn from key unless given."""
    if eps is None:
        eps = jax.random.normal(key, x0.shape, x0.dtype)
    _check_same_shape(x0=x0, eps=eps)
    alpha, sigma = alpha_sigma(_bcast(log_snr_t, x0))
    return alpha * x0 + sigma * eps, eps


def transition_coefficients(*, log_snr_s, log_snr_t):
    """alpha_{t|s} and sigma_{t|s}^2 of q(x_t | x_s), s < t (Kingma et al. 2021, eq. 33):

    alpha_{t|s} = alpha_t / alpha_s,
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = -sigma_t^2 expm1(lambda_t - lambda_s).
    """
    alpha_s, _ = alpha_sigma(log_snr_s)
    alpha_t, _ = alpha_sigma(log_snr_t)
    var = -jax.nn.sigmoid(-log_snr_t) * jnp.expm1(log_snr_t - log_snr_s)
    return alpha_t / alpha_s, var


def q_xt_given_xs(x_s, *, log_snr_s, log_snr_t):
    """q(x_t | x_s) for s < t; q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) is its
    case s = t - 1 (Ho et al. eq. 2). Returns (mean, variance)."""
    a, var = transition_coefficients(log_snr_s=_bcast(log_snr_s, x_s), log_snr_t=_bcast(log_snr_t, x_s))
    return a * x_s, jnp.broadcast_to(var, x_s.shape)


def sample_q_xt_given_xs(key, x_s, *, log_snr_s, log_snr_t):
    """One forward step x_t ~ q(x_t | x_s)."""
    mean, var = q_xt_given_xs(x_s, log_snr_s=log_snr_s, log_snr_t=log_snr_t)
    return mean + jnp.sqrt(var) * jax.random.normal(key, x_s.shape, x_s.dtype)


def forward_chain(key, x0, log_snr):
    """The whole chain x_0, x_1, ..., x_T by T successive q(x_t | x_{t-1}) steps in one lax.scan.

    ``log_snr`` is a discrete table of length T + 1 (index 0 = data). Returns an
    array of shape [T + 1, *x0.shape] whose index is the paper's t.
    """
    keys = jax.random.split(key, log_snr.shape[0] - 1)

    def step(x_prev, inputs):
        k, lam_prev, lam = inputs
        x = sample_q_xt_given_xs(k, x_prev, log_snr_s=lam_prev, log_snr_t=lam)
        return x, x

    _, xs = jax.lax.scan(step, x0, (keys, log_snr[:-1], log_snr[1:]))
    return jnp.concatenate([x0[None], xs], axis=0)


# ---------------------------------------------------------------------------
# Posterior q(x_s | x_t, x_0), s < t.
# ---------------------------------------------------------------------------


def q_posterior(x0, x_t, *, log_snr_s, log_snr_t):
    """q(x_s | x_t, x_0) = N(mu, sigma^2 I) for any s < t (Kingma et al. 2021, eqs. 31-32;
    Ho et al. eqs. 6-7 for s = t - 1):

    mu      = e^{lambda_t - lambda_s} (alpha_s / alpha_t) x_t + alpha_s (-expm1(lambda_t - lambda_s)) x_0,
    sigma^2 = sigma_s^2 (-expm1(lambda_t - lambda_s)).

    Returns (mean, variance, log_variance). With lambda_s = +inf (s = 0, data)
    the posterior is the point mass at x_0: mean x_0, variance 0. With lambda_t = -inf
    (SNR 0, a zero-terminal-SNR schedule's x_T) x_t carries no signal: mean alpha_s x_0,
    variance sigma_s^2.
    """
    _check_same_shape(x0=x0, x_t=x_t)
    lam_s, lam_t = _bcast(log_snr_s, x_t), _bcast(log_snr_t, x_t)
    alpha_s, _ = alpha_sigma(lam_s)
    one_minus_ratio = -jnp.expm1(lam_t - lam_s)          # 1 - SNR(t)/SNR(s), in [0, 1]
    # e^{lambda_t - lambda_s} alpha_s / alpha_t in logs, with lambda_t - log alpha_t written as
    # (lambda_t + softplus(lambda_t)) / 2 so that it stays 0 at SNR(t) = 0 (lambda_t = -inf, alpha_t = 0).
    log_coef_xt = 0.5 * (lam_t + jax.nn.softplus(lam_t)) - lam_s + 0.5 * jax.nn.log_sigmoid(lam_s)
    mean = jnp.exp(log_coef_xt) * x_t + alpha_s * one_minus_ratio * x0
    log_var = jax.nn.log_sigmoid(-lam_s) + jnp.log(one_minus_ratio)
    return mean, jnp.broadcast_to(jnp.exp(log_var), x_t.shape), jnp.broadcast_to(log_var, x_t.shape)


# ---------------------------------------------------------------------------
# Parameterizations: the network predicts eps, x0, v or the score.
# ---------------------------------------------------------------------------


def check_parameterization(name: str) -> None:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {name!r}")


def _edm_scale(alpha, sigma, sigma_data):
    """m = sqrt(sigma^2 + sigma_data^2 alpha^2): the standard deviation of x_t for data of standard
    deviation sigma_data; m / alpha = sqrt(sigma_ve^2 + sigma_data^2) of Karras et al. 2022, Table 1."""
    return jnp.sqrt(sigma ** 2 + (sigma_data * alpha) ** 2)


def edm_preconditioning(log_snr, sigma_data: float = EDM_SIGMA_DATA):
    """Karras et al. 2022 (EDM), Table 1, at sigma = sigma_ve = exp(-lambda / 2):

      c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
      c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4 = -lambda / 8,

    with D(y; sigma) = c_skip y + c_out F(c_in y; c_noise) on the VE variable y = x_t / alpha.
    The training weight lambda(sigma) = 1 / c_out^2 makes the loss ||F - F_target||^2 with unit
    weight (``simple_loss`` on the "edm" target). Returns (c_skip, c_out, c_in, c_noise).
    """
    log_snr = jnp.asarray(log_snr, jnp.float32)
    var = jnp.exp(-log_snr) + sigma_data ** 2
    sigma = jnp.exp(-0.5 * log_snr)
    return sigma_data ** 2 / var, sigma * sigma_data / jnp.sqrt(var), 1.0 / jnp.sqrt(var), -log_snr / 8.0


def network_input_scale(log_snr, parameterization: str, sigma_data: float = EDM_SIGMA_DATA):
    """The factor the network input x_t is multiplied by: c_in y = x_t / m for "edm" (Karras et al.
    c_in in VP terms, unit variance for data of standard deviation sigma_data), 1 otherwise."""
    check_parameterization(parameterization)
    if parameterization != "edm":
        return jnp.ones_like(jnp.asarray(log_snr, jnp.float32))
    alpha, sigma = alpha_sigma(log_snr)
    return 1.0 / _edm_scale(alpha, sigma, sigma_data)


def flow_scale(log_snr):
    """n = 1 / (alpha + sigma): the rectified-flow state is x^flow = n x_t, its time tau = n sigma =
    sigmoid(-lambda / 2) (so that x^flow = (1 - tau) x_0 + tau eps; ``vdm.schedules.flow_log_snr``)."""
    alpha, sigma = alpha_sigma(log_snr)
    return 1.0 / (alpha + sigma)


def x0_eps_from_output(output, x_t, log_snr_t, parameterization: str, sigma_data: float = EDM_SIGMA_DATA):
    """(x0_hat, eps_hat) from a network output in the given parameterization.

    With x_t = alpha x_0 + sigma eps:
      eps:   x0 = (x_t - sigma eps) / alpha
      x0:    eps = (x_t - alpha x0) / sigma
      v:     v = alpha eps - sigma x0 (Salimans & Ho 2022), so x0 = alpha x_t - sigma v,
             eps = sigma x_t + alpha v
      score: s = grad log q(x_t) = -eps / sigma (Song & Ermon 2019)
      flow:  u = eps - x0, the velocity d x^flow / d tau of the rectified flow through this level
             (Liu et al. 2023; Lipman et al. 2023): x0 = (x_t - sigma u) / (alpha + sigma),
             eps = (x_t + alpha u) / (alpha + sigma)
      edm:   F with x0 = c_skip y + c_out F (Karras et al. 2022, Table 1; y = x_t / alpha,
             sd = sigma_data, m = sqrt(sigma^2 + sd^2 alpha^2)): x0 = sd^2 alpha x_t / m^2 + sigma sd F / m,
             eps = sigma x_t / m^2 - alpha sd F / m. With sd = 1 (m = 1) F = -v.
    flow, edm and v are finite at every level, SNR 0 (alpha = 0) included; eps and score do not
    determine x0 there.
    """
    check_parameterization(parameterization)
    _check_same_shape(output=output, x_t=x_t)
    alpha, sigma = alpha_sigma(_bcast(log_snr_t, x_t))
    if parameterization == "eps":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif parameterization == "x0":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    elif parameterization == "v":
        x0 = alpha * x_t - sigma * output
        eps = sigma * x_t + alpha * output
    elif parameterization == "score":
        eps = -sigma * output
        x0 = (x_t - sigma * eps) / alpha
    elif parameterization == "flow":
        x0 = (x_t - sigma * output) / (alpha + sigma)
        eps = (x_t + alpha * output) / (alpha + sigma)
    else:  # edm
        m = _edm_scale(alpha, sigma, sigma_data)
        x0 = sigma_data ** 2 * alpha * x_t / m ** 2 + sigma * sigma_data * output / m
        eps = sigma * x_t / m ** 2 - alpha * sigma_data * output / m
    return x0, eps


def output_from_x0_eps(x0, eps, x_t, log_snr_t, parameterization: str, sigma_data: float = EDM_SIGMA_DATA):
    """The inverse of ``x0_eps_from_output``: the target a network of this parameterization regresses
    (edm: F = sigma x0 / (m sd) - sd alpha eps / m, unit variance when Var x0 = sd^2)."""
    check_parameterization(parameterization)
    alpha, sigma = alpha_sigma(_bcast(log_snr_t, x_t))
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return alpha * eps - sigma * x0
    if parameterization == "flow":
        return eps - x0
    if parameterization == "edm":
        m = _edm_scale(alpha, sigma, sigma_data)
        return sigma * x0 / (m * sigma_data) - sigma_data * alpha * eps / m
    return -eps / sigma


def convert(output, x_t, log_snr_t, source: str, target: str, sigma_data: float = EDM_SIGMA_DATA):
    """Convert a prediction from one parameterization to another at level log_snr_t."""
    x0, eps = x0_eps_from_output(output, x_t, log_snr_t, source, sigma_data)
    return output_from_x0_eps(x0, eps, x_t, log_snr_t, target, sigma_data)


# ---------------------------------------------------------------------------
# The reverse process p(x_s | x_t) = q(x_s | x_t, x0_hat) with a chosen variance.
# ---------------------------------------------------------------------------

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")


def check_variance_type(name: str) -> None:
    if name not in VARIANCE_TYPES:
        raise ValueError(f"variance type must be one of {VARIANCE_TYPES}, got {name!r}")


def learns_variance(variance_type: str) -> bool:
    """True when the network outputs an extra channel set for the variance."""
    check_variance_type(variance_type)
    return variance_type in ("learned_range", "learned")


def reverse_log_variance_bounds(*, log_snr_s, log_snr_t, log_snr_next=None):
    """(min_log, max_log) of the reverse step t -> s: the bounds of Nichol & Dhariwal's
    learned_range interpolation, which are also the fixed variances (``fixed_log_variance``).

      min_log = log of the posterior variance sigma_s^2 (1 - SNR_t/SNR_s)      (beta~_t, 'fixed_small')
      max_log = log of the forward variance sigma_{t|s}^2 = sigma_t^2 (1 - SNR_t/SNR_s)   (beta_t)

    The step into the data level (s = 0, lambda_s = +inf) has posterior variance 0.
    There min_log is the "clipped" posterior log-variance of improved-diffusion (and of
    Ho et al.'s code): the posterior variance of the *next* step on the same grid,
    q(x_t | x_u, x_0) with u the level after t,

      min_log = log sigma_t^2 (1 - SNR_u/SNR_t)          (beta~_2 when t = 1, u = 2),

    and max_log = log sigma_{t|0}^2 = log sigma_t^2 (beta_1). ``log_snr_next`` is
    lambda_u. On a respaced or strided grid u is the grid's next level, which is what
    improved-diffusion's respacing gives (its respaced schedule's posterior_variance[1]);
    in continuous time it is the next level of the sampling grid or of the T-step bound.
    Without a next level (``log_snr_next`` None, or not below lambda_t: a one-step
    grid) min_log falls back to max_log. Away from the data level ``log_snr_next`` is unused.
    """
    log_one_minus_ratio = jnp.log(-jnp.expm1(log_snr_t - log_snr_s))
    log_max = jax.nn.log_sigmoid(-log_snr_t) + log_one_minus_ratio
    if log_snr_next is None:
        log_first = log_max
    else:
        has_next = log_snr_next < log_snr_t
        gap = jnp.where(has_next, log_snr_next - log_snr_t, -1.0)  # keeps log(0) out of the unused branch
        log_first = jnp.where(has_next, jax.nn.log_sigmoid(-log_snr_t) + jnp.log(-jnp.expm1(gap)),
                              log_max)
    log_min = jnp.where(jnp.isinf(log_snr_s), log_first,
                        jax.nn.log_sigmoid(-log_snr_s) + log_one_minus_ratio)
    return log_min, log_max


def fixed_log_variance(variance_type: str, log_min, log_max, log_snr_s):
    """The fixed reverse log-variance from ``reverse_log_variance_bounds``' (min_log, max_log):
    fixed_small is min_log everywhere; fixed_large is max_log except at the step into the data
    level, where it is min_log (beta~_2 in place of beta_1: improved-diffusion's and Ho et al.'s
    code, ``np.append(posterior_variance[1], betas[1:])``, "to get a better decoder log
    likelihood")."""
    if variance_type == "fixed_small":
        return log_min
    if variance_type == "fixed_large":
        return jnp.where(jnp.isinf(log_snr_s), log_min, log_max)
    raise ValueError(f"fixed_log_variance takes 'fixed_small' or 'fixed_large', got {variance_type!r}")


def split_variance_output(output, variance_type: str):
    """Split a network output into (prediction, variance channels or None) along the last axis."""
    if not learns_variance(variance_type):
        return output, None
    if output.shape[-1] % 2:
        raise ValueError(f"variance type {variance_type!r} needs an output with twice the data "
                         f"channels, got {output.shape[-1]} channels")
    return jnp.split(output, 2, axis=-1)


def p_mean_variance(output, x_t, parameterization: str, variance_type: str, clip_x0=None, *,
                    log_snr_s, log_snr_t, log_snr_next=None, tables=None):
    """Mean and log-variance of the reverse step p(x_s | x_t) for s < t.

    The mean is the posterior mean q(x_s | x_t, x0_hat) at the predicted x0
    (Ho et al. eq. 11 for eps; the same for every parameterization); optional
    ``clip_x0 = (lo, hi)`` clips x0_hat first. The log-variance is
      fixed_small:   min_log, fixed_large: max_log (min_log into the data level),
      learned_range: frac max_log + (1 - frac) min_log, frac = (v + 1)/2 with the
                     network's extra output v (Nichol & Dhariwal 2021, eq. 15),
      learned:       the network's extra output, a free log-variance (seed 002/003),
    with (min_log, max_log) from ``reverse_log_variance_bounds`` (improved-diffusion's
    convention at the step into the data level, which needs ``log_snr_next``, the
    level after t on the same grid). ``tables`` (``schedules.reverse_step_tables``)
    replaces the log-SNR formulas for the posterior mean coefficients and the bounds
    by a discrete schedule's stored float64-derived tables (a step t -> t - 1).
    Returns (mean, log_variance, x0_hat).
    """
    pred, var_out = split_variance_output(output, variance_type)
    x0_hat, _ = x0_eps_from_output(pred, x_t, log_snr_t, parameterization)
    if clip_x0 is not None:
        x0_hat = jnp.clip(x0_hat, *clip_x0)
    lam_s, lam_t = _bcast(log_snr_s, x_t), _bcast(log_snr_t, x_t)
    if tables is None:
        mean, _, _ = q_posterior(x0_hat, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
        nxt = None if log_snr_next is None else _bcast(log_snr_next, x_t)
        log_min, log_max = reverse_log_variance_bounds(log_snr_s=lam_s, log_snr_t=lam_t, log_snr_next=nxt)
    else:
        mean = _bcast(tables.coef_x0, x_t) * x0_hat + _bcast(tables.coef_xt, x_t) * x_t
        log_min, log_max = _bcast(tables.log_var_min, x_t), _bcast(tables.log_var_max, x_t)
    if variance_type in ("fixed_small", "fixed_large"):
        log_var = fixed_log_variance(variance_type, log_min, log_max, lam_s)
    elif variance_type == "learned_range":
        frac = (var_out + 1.0) / 2.0
        log_var = frac * log_max + (1.0 - frac) * log_min
    else:
        log_var = var_out
    return mean, jnp.broadcast_to(log_var, x_t.shape), x0_hat
