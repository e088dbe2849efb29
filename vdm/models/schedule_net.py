"""The learned monotone log-SNR schedule of VDM (Kingma et al. 2021; their NoiseSchedule_NNet).

gamma~(t) = l1(t) + l3(phi(l2(t))) / hidden is a monotone MLP: every weight
enters through its absolute value, so each layer is increasing, and the
activation 2 (sigmoid(.) - 1/2) is increasing; t -> gamma~(t) is therefore
strictly increasing. It is rescaled to hit chosen endpoints,

    log_snr(t) = log_snr_max - (log_snr_max - log_snr_min)
                 * (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)),

so log_snr is strictly decreasing with log_snr(0) = log_snr_max and
log_snr(1) = log_snr_min (VDM's gamma = -log_snr, gamma_min = -log_snr_max).
The endpoints are the configured constants, or parameters initialised to them
(``learn_endpoints``; the span is kept positive as exp of a parameter).

As a schedule: ``log_snr_fn = functools.partial(LearnedLogSNR(...).apply, params)``
is a ``t -> log_snr(t)`` function like ``vdm.schedules.continuous_schedule``'s.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


ENDPOINT_PARAMS = ("log_snr_max", "log_span")  # LearnedLogSNR's parameters with learn_endpoints


def stop_endpoint_gradients(params):
    """LearnedLogSNR parameters with the endpoints' held fixed (stop_gradient): the schedule
    whose gradient reaches only its interior shape (losses.vdm_loss, shape_log_snr_fn)."""
    return {k: jax.lax.stop_gradient(v) if k in ENDPOINT_PARAMS else v for k, v in params.items()}


class MonotoneDense(nn.Module):
    """Dense layer with weights |W|: non-decreasing in every input (VDM's DenseMonotone)."""
    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = x @ jnp.abs(kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


class LearnedLogSNR(nn.Module):
    """``__call__(t) -> log_snr(t)``, t of any shape in [0, 1]; strictly decreasing in t."""
    log_snr_max: float = 13.3  # log_snr(0); VDM CIFAR-10: gamma_min = -13.3
    log_snr_min: float = -5.0  # log_snr(1); VDM CIFAR-10: gamma_max = 5
    hidden: int = 1024
    learn_endpoints: bool = False

    def __post_init__(self):
        for field in ("log_snr_max", "log_snr_min"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LearnedLogSNR.{field} must be a finite number, got {value!r}")
        if not self.log_snr_max > self.log_snr_min:
            raise ValueError(f"LearnedLogSNR.log_snr_max ({self.log_snr_max}) must exceed "
                             f"log_snr_min ({self.log_snr_min}): log-SNR decreases from t=0 to t=1")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"LearnedLogSNR.hidden must be an integer >= 1, got {self.hidden!r}")
        if not isinstance(self.learn_endpoints, bool):
            raise ValueError(f"LearnedLogSNR.learn_endpoints must be True or False, got {self.learn_endpoints!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, t):
        t = jnp.asarray(t, jnp.float32)
        g = self._gamma_tilde(jnp.concatenate([jnp.array([0.0, 1.0]), t.reshape(-1)]))
        frac = ((g[2:] - g[0]) / (g[1] - g[0])).reshape(t.shape)
        span = self.log_snr_max - self.log_snr_min
        top = self.log_snr_max
        if self.learn_endpoints:
            top = self.param("log_snr_max", nn.initializers.constant(top), (), jnp.float32)
            span = jnp.exp(self.param("log_span", nn.initializers.constant(math.log(span)), (), jnp.float32))
        return top - span * frac

    def _gamma_tilde(self, t):
        """VDM's NoiseSchedule_NNet on t [N] -> [N], increasing (its l1 bias cancels in the rescaling)."""
        t = t[:, None]
        linear = MonotoneDense(1, nn.initializers.constant(self.log_snr_max - self.log_snr_min), use_bias=False,
                               name="l1")(t)
        h = MonotoneDense(self.hidden, name="l2")(2.0 * t - 1.0)
        h = 2.0 * (nn.sigmoid(h) - 0.5)
        h = MonotoneDense(1, use_bias=False, name="l3")(h) / self.hidden
        return (linear + h)[:, 0]
