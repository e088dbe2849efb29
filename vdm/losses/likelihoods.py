"""Likelihood pieces of the bounds: units (bits/dim, dequantization), the Gaussian KL,
the prior term and the decoders log p(x_0 | ...), elementwise in nats."""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from vdm import diffusion

DECODERS = ("discretized", "gaussian")                   # p(x_0 | x_1) of the discrete ELBO
VDM_DECODERS = ("categorical", "discretized", "gaussian")  # p(x | z_0) of vdm_loss

BIN_WIDTH_8BIT = 2.0 / 255.0  # 8-bit data scaled to [-1, 1]: x = k / 127.5 - 1, k = 0..255
_MIDPOINT_THRESHOLD = 5e-3    # see discretized_gaussian_log_likelihood


def check_choice(argument: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {tuple(allowed)}, got {value!r}")


def sum_dims(x):
    """Sum over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def mean_dims(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def data_dims(x) -> int:
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
    return sum_dims(gaussian_kl(mean, logvar, 0.0, 0.0))


# ---------------------------------------------------------------------------
# Decoders: log p(x_0 | ...) elementwise, in nats.
# ---------------------------------------------------------------------------


def gaussian_log_likelihood(x, mean, log_scale):
    """log N(x; mean, e^{2 log_scale}) elementwise, for continuous (real-valued) data."""
    z = (x - mean) * jnp.exp(-log_scale)
    return -0.5 * (jnp.square(z) + math.log(2.0 * math.pi)) - log_scale


def log1mexp(d):
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
    return log_hi + log1mexp(log_ndtr(lo) - log_hi)


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


def decoder_nll(decoder: str, x0, mean, log_scale):
    """-log p(x0 | .) summed over dimensions, for the Gaussian decoders of DECODERS."""
    if decoder == "discretized":
        return -sum_dims(discretized_gaussian_log_likelihood(x0, mean, log_scale))
    return -sum_dims(gaussian_log_likelihood(x0, mean, log_scale))
