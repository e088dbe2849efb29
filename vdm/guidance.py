"""Guided sampling of a class-conditional model: the model function for given (labels, scale).

A class-conditional network (``config.data.conditional``, trained with label dropout
``train.label_dropout``) predicts eps(x_t, c) for a label c and eps(x_t) for its null
class ``num_classes``. Classifier-free guidance (Ho & Salimans 2022, eq. 6) samples with

    eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t),    w = guidance scale >= 0,

w = 0 being the plain conditional model. ``guided_model_fn`` builds that model function
for one (labels, w); ``sample_guided`` draws samples with any sampler through
``samplers.sample``, compiled once per w (the labels and the parameters are traced
arguments).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp
import numpy as np

from vdm import build
from vdm import diffusion
from vdm import samplers


def guided_model_fn(model_fn: Callable, labels, guidance_scale: float, null_class: int,
                    variance_type: str = "fixed_small") -> Callable:
    """``model_fn(x_t, t, labels)`` -> the guided ``model_fn(x_t, t)`` for ``labels`` [B] and
    scale w = ``guidance_scale``: the conditional model at w = 0, else the classifier-free
    combination (``samplers.classifier_free_guidance``, null class ``null_class``)."""
    check_guidance_scale(guidance_scale)
    labels = jnp.asarray(labels)
    if guidance_scale == 0:
        return lambda x_t, t: model_fn(x_t, t, labels)
    return samplers.classifier_free_guidance(model_fn, labels, guidance_scale, null_class, variance_type)


def check_guidance_scale(guidance_scale) -> None:
    if not (isinstance(guidance_scale, (int, float)) and guidance_scale >= 0 and np.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (0: the conditional model), "
                         f"got {guidance_scale!r}")


def network_model_fn(setup: build.Setup, time_input: str) -> Callable:
    """``fn(params, x_t, t, labels)``: the Setup's network as the model function of
    ``samplers.sample(..., params=params, labels=...)``. Build it once and reuse it, so every
    call with the same sampler settings and w reuses one compile."""
    if not setup.network.num_classes:
        raise ValueError("guided sampling needs a class-conditional model (config.data.conditional = True); "
                         "this one has no labels")

    def fn(params, x_t, t, labels):
        return build.make_model_fn(setup.network, setup.process, time_input, params)(x_t, t, labels)

    return fn


@functools.lru_cache(maxsize=None)
def _sampler_model(model_fn: Callable, guidance_scale: float, null_class: int, variance_type: str) -> Callable:
    """The guided model as ``samplers.sample`` takes it with ``params = (params, labels)``: one
    function object per (network, w), so its compile is reused for any parameters and labels."""

    def model(params_and_labels, x_t, t):
        params, labels = params_and_labels
        return guided_model_fn(functools.partial(model_fn, params), labels, guidance_scale, null_class,
                               variance_type)(x_t, t)

    return model


def sample_guided(model_fn: Callable, setup: build.Setup, config, params, key, labels, guidance_scale: float,
                  shape, *, sampler: str, num_steps, spacing: str, clip_x0, **options):
    """Samples of ``shape`` [n, ...] of classes ``labels`` [n] at guidance scale w, with any sampler.

    ``model_fn`` is ``network_model_fn(setup, ...)``; the sampler runs ``guided_model_fn`` of
    it, compiled once per w (the parameters and labels are traced arguments).
    """
    check_guidance_scale(guidance_scale)
    labels = np.asarray(labels, np.int32)
    num_classes = setup.network.num_classes
    if labels.shape != tuple(shape[:1]) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be {shape[0]} classes in 0..{num_classes - 1}, got {labels}")
    d, process = config.diffusion, setup.process
    levels = (dict(schedule=process.schedule) if process.discrete
              else dict(log_snr_fn=lambda t: process.log_snr(params, t)))
    model = _sampler_model(model_fn, float(guidance_scale), num_classes, d.variance)
    return samplers.sample(model, key, tuple(shape), sampler=sampler, num_steps=num_steps, spacing=spacing,
                           parameterization=d.parameterization, variance_type=d.variance, clip_x0=clip_x0,
                           params=(params, jnp.asarray(labels)),
                           sigma_data=d.get("sigma_data", diffusion.EDM_SIGMA_DATA), **levels, **options)
