"""Simple (regression) losses: eps / x0 / v / score targets, L2 or L1, and the loss
weightings of the literature (Ho et al. 2020; Kingma et al. 2021; Hang et al. 2023)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vdm import diffusion
from vdm.losses.likelihoods import check_choice, log1mexp, mean_dims

LOSS_TYPES = ("l2", "l1")


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
    return (jax.nn.log_sigmoid(log_snr_s) + 2.0 * log1mexp(log_snr_t - log_snr_s)
            - math.log(2.0) - log_variance)


# log w(lambda_t) of each loss weighting (``simple_loss``); "none" is w = 1. A new weighting is
# its entry here.
LOG_WEIGHTS = {
    "elbo": lambda lam, log_snr_s, log_variance, snr_gamma: elbo_log_weight(
        log_snr_s=log_snr_s, log_snr_t=lam, log_variance=log_variance),
    "snr": lambda lam, log_snr_s, log_variance, snr_gamma: lam,
    "truncated_snr": lambda lam, log_snr_s, log_variance, snr_gamma: jnp.maximum(lam, 0.0),
    "min_snr": lambda lam, log_snr_s, log_variance, snr_gamma: jnp.minimum(lam, math.log(snr_gamma)),
}
WEIGHTINGS = ("none",) + tuple(LOG_WEIGHTS)


def check_simple_args(parameterization, target, loss_type, weighting, snr_gamma) -> str:
    """Validate simple_loss's options; returns the target (default: the parameterization)."""
    diffusion.check_parameterization(parameterization)
    target = parameterization if target is None else target
    check_choice("target", target, diffusion.PARAMETERIZATIONS)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("weighting", weighting, WEIGHTINGS)
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
    target = check_simple_args(parameterization, target, loss_type, weighting, snr_gamma)
    if weighting == "elbo" and log_snr_s is None:
        raise ValueError("weighting 'elbo' needs log_snr_s, the log-SNR of the previous level")
    diffusion._check_same_shape(output=output, x0=x0, eps=eps, x_t=x_t)

    pred = diffusion.convert(output, x_t, log_snr_t, parameterization, target, sigma_data)
    true = diffusion.output_from_x0_eps(x0, eps, x_t, log_snr_t, target, sigma_data)
    err = pred - true
    per_example = mean_dims(jnp.square(err) if loss_type == "l2" else jnp.abs(err))
    if weighting == "none":
        return per_example
    lam = jnp.asarray(log_snr_t, per_example.dtype)
    log_w = LOG_WEIGHTS[weighting](lam, log_snr_s, log_variance, snr_gamma)
    return jnp.exp(log_w + _log_x0_error_factor(target, lam, sigma_data)) * per_example
