"""Classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from vdm import diffusion


def classifier_free_guidance(model_fn: Callable, labels, guidance_scale: float, null_label: int,
                             variance_type: str = "fixed_small") -> Callable:
    """Turn ``model_fn(x, t, label)`` into the guided ``model_fn(x, t)`` (Ho & Salimans 2022, eq. 6):

      eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null),   w = guidance_scale (w = 0: conditional).

    The output is combined in the model's own parameterization: each conversion to
    eps is affine in the output at fixed (x_t, lambda) and the weights 1 + w and -w
    sum to 1, so this *is* the eps-space combination for eps, x0, v and score. Learned
    variance channels come from the conditional branch. Both branches run as one
    batch of 2B.
    """
    labels = jnp.asarray(labels)

    def guided(x, t):
        b = x.shape[0]
        cond = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), cond)
        pred_c, var_c = diffusion.split_variance_output(out[:b], variance_type)
        pred_u, _ = diffusion.split_variance_output(out[b:], variance_type)
        pred = (1.0 + guidance_scale) * pred_c - guidance_scale * pred_u
        return pred if var_c is None else jnp.concatenate([pred, var_c], axis=-1)

    return guided
