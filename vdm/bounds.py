"""The likelihood estimator of a trained model, chosen in one place.

Training-time evaluation (``eval.elbo``, through ``build.build_objective``) and
``scripts/evaluate.py --elbo`` both get their per-example terms function
``terms_fn(params, key, x) -> {"total": [B], ...}`` (nats; ``vdm.likelihood``) from
``elbo_terms``:

  exact  discrete time: the sum over all T terms (Ho et al. eq. 5); continuous time: the
         exact sum over the T terms of the T-step bound (Kingma et al. eq. 15), T = ``exact_T``
  mc     discrete time: ``num_samples`` Monte-Carlo timesteps; continuous time: the VDM bound
         (eqs. 10-17) from ``num_samples`` low-discrepancy times per example
  ode    the probability-flow ODE's log-likelihood (Song et al. 2021; Heun steps on the
         log-SNR grid, exact or Hutchinson divergence), not a bound

A continuous-time bound is taken on the path's own interval (``elbo_time``).
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections

from vdm import likelihood
from vdm import losses
from vdm import ode_likelihood

ELBO_METHODS = ("exact", "mc", "ode")
EVAL_METHODS = ("mc", "exact")  # eval.elbo during training: the ODE needs its solver settings (evaluate.py)
ODE_DIVERGENCES = ("exact", "hutchinson")


def elbo_time(diffusion_cfg: ml_collections.ConfigDict) -> Callable:
    """u in [0, 1] -> the time at which the VDM bound (``losses.vdm_loss``) evaluates the path.

    The identity, except for a path whose log-SNR is infinite at its ends (the 'flow'
    schedule: +inf at t = 0, SNR 0 at t = 1), which has no finite prior or decoder term: its
    bound is that of the path on [T_CLIP, 1 - T_CLIP] (score_sde's eps = 1e-5, the interval of
    its likelihoods), t = T_CLIP + (1 - 2 T_CLIP) u, prior at the upper end, decoder at the lower.
    """
    if diffusion_cfg.time == "continuous" and diffusion_cfg.schedule == "flow":
        return losses.clipped_time
    return lambda u: u


def elbo_terms(method: str, process, model_fn_of: Callable, diffusion_cfg: ml_collections.ConfigDict, *,
               decoder: str, num_samples: int = 1, chunk: int = 1, exact_T: int = 0, ode_steps: int = 100,
               ode_divergence: str = "exact", ode_probes: int = 4, dequantize: bool = False) -> Callable:
    """``terms_fn(params, key, x)`` of ``method`` (module docstring) for the model
    ``model_fn_of(params) -> model_fn(x_t, t)`` of a ``build.Process``. ``dequantize``: the ODE
    likelihood of 8-bit data with uniform dequantization."""
    d = diffusion_cfg
    if method not in ELBO_METHODS:
        raise ValueError(f"method must be one of {ELBO_METHODS}, got {method!r}")
    if method == "ode":
        if process.discrete:
            grid_of = lambda p: ode_likelihood.discrete_grid(process.schedule.log_snr, ode_steps)  # noqa: E731
        else:
            grid_of = lambda p: ode_likelihood.continuous_grid(lambda t: process.log_snr(p, t), ode_steps)  # noqa: E731
        return likelihood.ode_nll_terms(model_fn_of, grid_of, parameterization=d.parameterization,
                                        variance_type=d.variance, divergence=ode_divergence,
                                        num_probes=ode_probes, dequantize=dequantize)
    if not process.discrete:
        tau = elbo_time(d)
        bound_model_fn_of = lambda p: (lambda z, u: model_fn_of(p)(z, tau(u)))  # noqa: E731
        bound_log_snr = lambda p, u: process.log_snr(p, tau(u))  # noqa: E731
        if method == "exact":
            return likelihood.vdm_elbo_exact_terms(bound_model_fn_of, bound_log_snr, exact_T, chunk=chunk,
                                                   parameterization=d.parameterization, decoder=decoder)
        return likelihood.vdm_elbo_terms(bound_model_fn_of, bound_log_snr, num_samples, T=d.T,
                                         parameterization=d.parameterization, decoder=decoder)
    common = dict(parameterization=d.parameterization, variance_type=d.variance, decoder=decoder)
    if method == "exact":
        return likelihood.discrete_elbo_terms(model_fn_of, process.schedule, chunk=chunk, **common)
    return likelihood.discrete_elbo_mc_terms(model_fn_of, process.schedule, num_samples, **common)


def conditional_terms(terms_of_label: Callable) -> Callable:
    """``terms_fn(params, key, x, labels)`` of a class-conditional model, the bound on
    -log p(x_i | y_i): ``terms_of_label(y)`` (the unconditional-form terms function of the model
    given label y) one example at a time, each with its own label and key, under ``vmap``."""
    def terms_fn(params, key, x, labels):
        def one(k, xi, yi):
            return jax.tree.map(lambda v: v[0], terms_of_label(yi)(params, k, xi[None]))

        return jax.vmap(one)(jax.random.split(key, x.shape[0]), x, labels)

    return terms_fn
