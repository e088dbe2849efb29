"""Classifier guidance (Dhariwal & Nichol 2021, Alg. 1 and 2; Song et al. 2021, App. I.4).

With a classifier p_phi(y | x_t) trained on noisy inputs, the score of the guided
distribution p(x_t | y)^(s) ∝ q(x_t) p_phi(y | x_t)^s is

  grad log q(x_t) + s grad_x log p_phi(y | x_t),

and since grad log q(x_t) = -eps(x_t) / sigma_t (Tweedie), the guided noise prediction is

  eps~ = eps - s sigma_t grad_x log p_phi(y | x_t)                 (Dhariwal & Nichol, eq. 14)

with the x0 prediction that keeps x_t = alpha_t x0~ + sigma_t eps~:
x0~ = x0 + s (sigma_t^2 / alpha_t) grad_x log p_phi(y | x_t). ``guided_output`` writes this back
into the model's own parameterization through ``vdm.diffusion``'s conversions, so the wrapped
model is an ordinary ``model_fn(x_t, t)`` for every sampler and every parameterization.

At s = 1 with the exact posterior p(y | x_t) of the data, grad log p(y | x_t) =
grad log q(x_t | y) - grad log q(x_t) and the guided model is exactly the conditional one
(tests/test_classifier_guidance.py checks this against the Gaussian-mixture oracle).

At SNR 0 (alpha_t = 0, log-SNR -inf) x_t carries no information about y, so the exact
classifier's gradient is 0 there; the term is dropped at that level (x0~ would be infinite).

Composition with classifier-free guidance: wrap ``samplers.classifier_free_guidance(model, labels,
w, null)`` (a ``model_fn(x_t, t)``). Its eps is (1 + w) eps(c) - w eps(null) and both
guidances add in eps space, so the order does not matter.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion


def guided_output(output, grad_log_prob, x_t, log_snr, scale, parameterization: str,
                  sigma_data: float = diffusion.EDM_SIGMA_DATA):
    """A prediction in ``parameterization`` moved by the guidance term: eps -> eps - s sigma g and
    x0 -> x0 + s (sigma^2 / alpha) g, g = grad_x log p(y | x_t) (no variance channels)."""
    x0, eps = diffusion.x0_eps_from_output(output, x_t, log_snr, parameterization, sigma_data)
    lam = jnp.reshape(log_snr, jnp.shape(log_snr) + (1,) * (x_t.ndim - jnp.ndim(log_snr)))
    alpha, sigma = diffusion.alpha_sigma(lam)
    informative = alpha > 0
    g = jnp.where(informative, scale * grad_log_prob, 0.0)
    x0 = x0 + jnp.where(informative, sigma ** 2 / jnp.where(informative, alpha, 1.0), 0.0) * g
    return diffusion.output_from_x0_eps(x0, eps - sigma * g, x_t, log_snr, parameterization, sigma_data)


def classifier_guidance(model_fn: Callable, log_prob_fn: Callable, labels, scale, *, log_snr_fn: Callable,
                        parameterization: str = "eps", variance_type: str = "fixed_small",
                        sigma_data: float = diffusion.EDM_SIGMA_DATA) -> Callable:
    """Turn ``model_fn(x_t, t)`` into the classifier-guided ``model_fn(x_t, t)``.

    ``log_prob_fn(x_t, log_snr, labels) -> [B]`` is log p_phi(y | x_t) at log-SNR ``log_snr`` [B]
    (a ``noisy_classifier_train.ClassifierRun.log_prob``, or ``exact.classifier_log_prob``);
    ``labels`` [B] the class of each sample; ``scale`` s (0: unguided; may be traced);
    ``log_snr_fn(t)`` maps the model's time to the log-SNR (a discrete schedule's
    ``schedule.log_snr[t]``). Learned-variance channels pass through unchanged.

    The labels are fixed in the returned function (so it can wrap a classifier-free-guided model,
    whose own labels are its business): sample it on one device; ``samplers.sample(..., pmap=True)``
    would split x but not these labels.
    """
    diffusion.check_parameterization(parameterization)
    diffusion.check_variance_type(variance_type)
    labels = jnp.asarray(labels)

    def guided(x, t):
        out = model_fn(x, t)
        pred, var = diffusion.split_variance_output(out, variance_type)
        lam = jnp.broadcast_to(log_snr_fn(t), x.shape[:1]).astype(jnp.float32)
        grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, lam, labels)))(x)
        pred = guided_output(pred, grad, x, lam, scale, parameterization, sigma_data)
        return pred if var is None else jnp.concatenate([pred, var], axis=-1)

    return guided


def levels(schedule=None, log_snr_fn: Callable | None = None) -> Callable:
    """The model-time -> log-SNR map of a discrete ``schedule`` (t in 1..T) or a continuous ``log_snr_fn``."""
    if (schedule is None) == (log_snr_fn is None):
        raise ValueError("give exactly one of schedule (a DiscreteSchedule) or log_snr_fn (continuous time)")
    return (lambda t: schedule.log_snr[t]) if schedule is not None else log_snr_fn
