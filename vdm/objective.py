"""The training objective of a config: per-example randomness, the loss functions of each
time mode, label dropout and the ELBO estimate of training-time evaluation.

Every loss function here has the form ``loss(params, key, index, x, loss_state, train,
labels) -> (per-example loss [b], aux)`` over ``model_fn(params, key, train, labels)``, the
network as a model function (``build.make_model_fn``); ``build.build_objective`` picks one
and bundles it into an ``Objective``. Every random draw of an example (its t, noise and
label dropout) is folded from the step's key and the example's global index, so a step does
not depend on how the global batch is split over devices.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vdm import bounds
from vdm import losses
from vdm import models


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 1/phi: frac(u + i/phi) is a low-discrepancy sequence in i


def example_keys(key, index):
    """One key per example, folded from the step's key and the example's global index, so an
    example's randomness does not depend on which device or host processes it."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def example_normal(keys, x):
    """eps_i ~ N(0, I) with x_i's shape, each from its own key."""
    return jax.vmap(lambda k, xi: jax.random.normal(k, xi.shape, xi.dtype))(keys, x)


LABEL_DROPOUT_STREAM = 0x1abe1  # folded into the step's key for the label-dropout draws


def drop_labels(key, index, labels, p_uncond: float, null_class: int):
    """Classifier-free guidance's label dropout (Ho & Salimans 2022, Alg. 1): label_i becomes the
    null class with probability p_uncond, decided by u_i ~ U(0, 1) drawn from example i's own key
    (``example_keys`` of the step's key folded with LABEL_DROPOUT_STREAM and its global index), so
    which examples lose their label does not depend on the device count."""
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(example_keys(jax.random.fold_in(key, LABEL_DROPOUT_STREAM),
                                                                   index))
    return jnp.where(u < p_uncond, jnp.asarray(null_class, labels.dtype), labels)


def low_discrepancy_times(key, index):
    """u_i = frac(u + i / phi), u ~ U(0, 1) per step: evenly spread times over the global batch
    for any batch size or device split (the Kronecker sequence; Kingma et al. 2021, App. I.1,
    spread u + i/B the same way)."""
    return jnp.mod(jax.random.uniform(key, ()) + index.astype(jnp.float32) * GOLDEN, 1.0)


class Objective(NamedTuple):
    """The training objective of a config, on one device's share of a batch.

    loss(params, key, index, x, loss_state, train, labels=None) -> (per-example loss [b], aux):
      ``key`` is the step's key (the same on every device), ``index`` [b] the examples' global
      indices, from which every random draw (t, noise, label dropout) is folded; aux holds each
      example's time ``t`` [b] (and its ``vlb_term`` with importance sampling). A conditional
      objective (``num_classes`` > 0) takes the labels [b]; with ``train`` they are dropped to
      the null class at rate ``train.label_dropout`` (``drop_labels``);
    nelbo_bpd(params, key, x, label=None) -> an estimate of -ELBO(x) (of -log p(x | label) for a
      conditional objective) in bits/dim for one example x;
    init_loss_state() -> the importance sampler's LossHistory ({} when unused);
    update_loss_state(loss_state, aux) -> the history after a step, from the aux of the
      whole global batch.
    """

    loss: Callable
    nelbo_bpd: Callable
    init_loss_state: Callable
    update_loss_state: Callable
    num_classes: int = 0


def decoder_for(loss_cfg: ml_collections.ConfigDict, discrete_8bit: bool) -> str:
    """``loss.decoder``, with "auto" resolved from the data: 8-bit data get the discretized
    Gaussian (discrete time) or VDM's categorical decoder (continuous), real data a Gaussian."""
    if loss_cfg.decoder != "auto":
        return loss_cfg.decoder
    if not discrete_8bit:
        return "gaussian"
    return "discretized" if loss_cfg.name in losses.LOSS_KINDS else "categorical"


def split_example_keys(key, index):
    """Per-example keys for (t, eps, eps_0), the antithetic time offset's key and this device's
    dropout key, from three separate streams of the step's key (no key is both split and drawn
    from)."""
    k_examples, k_offset, k_drop = jax.random.split(key, 3)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(k_examples, index))
    return keys[:, 0], keys[:, 1], keys[:, 2], k_offset, jax.random.fold_in(k_drop, index[0])


def continuous_times(loss_cfg: ml_collections.ConfigDict, k_t, k_offset, index):
    """u in [0, 1) per example: low-discrepancy over the global batch (``loss.antithetic``) or
    independent uniforms."""
    if loss_cfg.antithetic:
        return low_discrepancy_times(k_offset, index)
    return jax.vmap(lambda k: jax.random.uniform(k, ()))(k_t)


def discrete_loss_fn(config: ml_collections.ConfigDict, model_fn: Callable, process, decoder: str):
    """``loss(params, key, index, x, loss_state, train, labels)`` of ``losses.discrete_loss`` with
    t uniform on 1..T or importance-sampled from the loss history (``loss.importance_sampling``)."""
    d, lc = config.diffusion, config.loss

    def loss(params, key, index, x, loss_state, train, labels):
        k_t, k_eps, _, _, k_drop = split_example_keys(key, index)
        if lc.importance_sampling:
            t, w = jax.vmap(lambda k: losses.loss_history_sample(loss_state, k, 1))(k_t)
            t, w = t[:, 0], w[:, 0]
        else:
            t = jax.vmap(lambda k: jax.random.randint(k, (), 1, process.T + 1))(k_t)
            w = None
        values, metrics = losses.discrete_loss(
            model_fn(params, k_drop, train, labels), k_drop, x, process.schedule, kind=lc.name,
            loss_type=lc.loss_type, weighting=lc.weighting, target=lc.target or None, snr_gamma=lc.snr_gamma,
            hybrid_lambda=lc.hybrid_lambda, t=t, weights=w, eps=example_normal(k_eps, x),
            parameterization=d.parameterization, variance_type=d.variance, decoder=decoder)
        return values, ({"t": metrics["t"], "vlb_term": metrics["vlb_term"]} if lc.importance_sampling
                        else {"t": metrics["t"]})

    return loss


def vdm_loss_fn(config: ml_collections.ConfigDict, model_fn: Callable, process, decoder: str):
    """``loss(...)`` of ``losses.vdm_loss`` in bits/dim on the path's bound interval
    (``bounds.elbo_time``); a learned schedule's end points get the prior and decoder gradients
    only (``stop_endpoint_gradients``), its interior follows ``loss.schedule_gradient``."""
    d, lc = config.diffusion, config.loss
    bound_time = bounds.elbo_time(d)

    def loss(params, key, index, x, loss_state, train, labels):
        k_t, k_eps, k_eps0, k_offset, k_drop = split_example_keys(key, index)
        fixed_ends = ({**params, "schedule": models.schedule_net.stop_endpoint_gradients(params["schedule"])}
                      if "schedule" in params else params)
        net = model_fn(params, k_drop, train, labels)
        total, metrics = losses.vdm_loss(
            lambda z, t: net(z, bound_time(t)), lambda t: process.log_snr(params, bound_time(t)), k_drop, x,
            u=continuous_times(lc, k_t, k_offset, index), eps=example_normal(k_eps, x),
            eps_0=example_normal(k_eps0, x), shape_log_snr_fn=lambda t: process.log_snr(fixed_ends, bound_time(t)),
            T=d.T, parameterization=d.parameterization, decoder=decoder, schedule_gradient=lc.schedule_gradient)
        return losses.bits_per_dim(total, math.prod(x.shape[1:])), {"t": metrics["t"]}

    return loss


def continuous_simple_loss_fn(config: ml_collections.ConfigDict, model_fn: Callable, process):
    """``loss(...)`` of EDM / flow matching / L_simple at sampled times (``losses.continuous_simple_loss``)."""
    d, lc = config.diffusion, config.loss

    def loss(params, key, index, x, loss_state, train, labels):
        k_t, k_eps, _, k_offset, k_drop = split_example_keys(key, index)
        values, metrics = losses.continuous_simple_loss(
            model_fn(params, k_drop, train, labels), lambda t: process.log_snr(params, t), k_drop, x,
            parameterization=d.parameterization, t_sampling=lc.t_sampling, loc=lc.t_loc, scale=lc.t_scale,
            sigma_data=d.sigma_data, u=continuous_times(lc, k_t, k_offset, index), eps=example_normal(k_eps, x))
        return values, {"t": metrics["t"]}

    return loss


def elbo_bpd_fn(config: ml_collections.ConfigDict, process, model_fn_of: Callable, decoder: str) -> Callable:
    """``nelbo_bpd(params, key, x, label=None)``: the ``eval.elbo`` estimate of one example
    (``bounds.elbo_terms``; ``model_fn_of(params, label)`` is the model given the label) in
    bits/dim on the 8-bit scale: a dequantized density's bound gets log2(127.5) per dim."""
    d, ev = config.diffusion, config.eval

    def nelbo_bpd(params, key, x, label=None):
        terms_fn = bounds.elbo_terms(ev.elbo, process, lambda p: model_fn_of(p, label), d, decoder=decoder,
                                     num_samples=ev.elbo_samples, chunk=ev.elbo_chunk, exact_T=d.T)
        nats = terms_fn(params, key, x[None])["total"][0]
        if config.data.dequantize:
            nats = losses.dequantized_nats(nats, x.size)
        return losses.bits_per_dim(nats, x.size)

    return nelbo_bpd


def with_label_dropout(loss: Callable, num_classes: int, p_uncond: float) -> Callable:
    """The loss given the labels (None: unconditional), dropped to the null class at rate
    p_uncond in training (``drop_labels``)."""
    def labelled_loss(params, key, index, x, loss_state, train, labels=None):
        if (labels is None) != (num_classes == 0):
            raise ValueError(f"the objective's network has num_classes = {num_classes}: labels must be "
                             f"{'given' if num_classes else 'None'}")
        if labels is not None and train and p_uncond > 0:
            labels = drop_labels(key, index, labels, p_uncond, num_classes)
        return loss(params, key, index, x, loss_state, train, labels)

    return labelled_loss
