"""The model as the samplers see it: a ``model_fn(x_t, t)`` read through its parameterization
into (x0_hat, eps_hat), with optional clipping or dynamic thresholding of x0_hat."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from vdm import diffusion


def dynamic_threshold(x0, quantile: float = 0.995):
    """Saharia et al. 2022 (Imagen) §2.3: s = max(1, the quantile of |x0| per example);
    x0 -> clip(x0, -s, s) / s."""
    s = jnp.quantile(jnp.abs(x0).reshape(x0.shape[0], -1), quantile, axis=1)
    s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A ``model_fn(x_t, t)`` with what the samplers need to read its output.

    Calling it at a level (t, log_snr) gives (x0_hat, eps_hat, variance channels
    or None) through ``vdm.diffusion``'s conversions. ``clip_x0 = (lo, hi)`` (True: (-1, 1),
    False: no clipping) or
    ``threshold`` (a quantile, dynamic thresholding) post-processes x0_hat, and
    eps_hat is then recomputed from it (as in Ho et al.'s and DDIM's code).
    Hashable (by model_fn identity), so it can be a static argument of jit.
    """

    model_fn: Callable
    parameterization: str = "eps"
    variance_type: str = "fixed_small"
    clip_x0: tuple | None = None
    threshold: float | None = None
    sigma_data: float = diffusion.EDM_SIGMA_DATA  # the "edm" parameterization's (Karras et al.)

    def __post_init__(self):
        diffusion.check_parameterization(self.parameterization)
        diffusion.check_variance_type(self.variance_type)
        if isinstance(self.clip_x0, (bool, np.bool_)):  # True: the data range [-1, 1]; False: none
            object.__setattr__(self, "clip_x0", (-1.0, 1.0) if self.clip_x0 else None)
        if self.clip_x0 is not None:
            lo, hi = (float(v) for v in self.clip_x0)
            if not lo < hi:
                raise ValueError(f"clip_x0 must be (lo, hi) with lo < hi, got {self.clip_x0!r}")
            object.__setattr__(self, "clip_x0", (lo, hi))
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold (a quantile of |x0|) must lie in (0, 1), got {self.threshold!r}")
        if self.clip_x0 is not None and self.threshold is not None:
            raise ValueError("give at most one of clip_x0 and threshold")

    def __call__(self, x, t, log_snr):
        out = self.model_fn(x, jnp.broadcast_to(t, x.shape[:1]))
        pred, var_out = diffusion.split_variance_output(out, self.variance_type)
        x0, eps = diffusion.x0_eps_from_output(pred, x, log_snr, self.parameterization, self.sigma_data)
        if self.clip_x0 is not None or self.threshold is not None:
            x0 = jnp.clip(x0, *self.clip_x0) if self.clip_x0 else dynamic_threshold(x0, self.threshold)
            _, eps = diffusion.x0_eps_from_output(x0, x, log_snr, "x0")
        return x0, eps, var_out
