"""Noise schedules: discrete tables indexed by the paper's t, continuous log-SNR.

Discrete (Ho et al. 2020 indexing). A table has length T + 1 and its index *is*
the paper's t: index 0 is the clean level (beta_0 = 0, alpha_bar_0 = 1) and
t = 1..T are the noisy levels, so ``schedule.alpha_bars[t]`` is alpha_bar_t.
Tables are computed once in float64 with NumPy from the betas (log space:
log alpha_bar = cumsum log1p(-beta); 1 - alpha_bar = -expm1(log alpha_bar)) and
stored as float32, so every entry is the float64 value rounded once.

Continuous (Kingma et al. 2021). A schedule is a function t in [0, 1] ->
log_snr(t) = log(alpha_t^2 / sigma_t^2), strictly decreasing, variance
preserving: alpha_t^2 = sigmoid(log_snr), sigma_t^2 = sigmoid(-log_snr).
VDM's gamma(t) is -log_snr(t).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_BETA = 0.999  # Nichol & Dhariwal 2021, §3.2: clip betas to avoid singularities at t = T.


# ---------------------------------------------------------------------------
# Discrete beta tables (float64, length T + 1, betas[0] = 0).
# ---------------------------------------------------------------------------


def _with_clean_level(betas_1_to_T: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.asarray(betas_1_to_T, dtype=np.float64)])


def _betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], T: int,
                          max_beta: float) -> np.ndarray:
    """beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), clipped (Nichol & Dhariwal eq. 17)."""
    t = np.arange(T + 1, dtype=np.float64) / T
    log_ab = np.log(alpha_bar(t))
    betas = -np.expm1(log_ab[1:] - log_ab[:-1])
    return _with_clean_level(np.minimum(betas, max_beta))


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale: bool = True) -> np.ndarray:
    """Ho et al. 2020 §4: betas linear from 1e-4 to 0.02 over T = 1000 steps.

    With ``rescale`` (Nichol & Dhariwal 2021, as in their code) both ends are
    multiplied by 1000 / T, so chains of other lengths add the same total noise;
    at T = 1000 the factor is 1.
    """
    scale = 1000.0 / T if rescale else 1.0
    return _with_clean_level(np.linspace(beta_start * scale, beta_end * scale, T))


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Linear in sqrt(beta) (Rombach et al. 2022, latent diffusion)."""
    return _with_clean_level(np.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2)


def constant_betas(T: int, beta: float = 0.02) -> np.ndarray:
    """beta_t = beta for every t (Sohl-Dickstein et al. 2015; seed 002 uses 0.02, T = 250)."""
    return _with_clean_level(np.full(T, beta))


def cosine_betas(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    return _betas_from_alpha_bar(lambda u: f(u) / f(0.0), T, max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = MAX_BETA) -> np.ndarray:
    """Jabri et al. 2022 (RIN), sigmoid schedule of alpha_bar:

    alpha_bar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau))
                   / (sigmoid(end/tau) - sigmoid(start/tau)).
    """
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    alpha_bar = lambda u: (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
    # alpha_bar(1) = 0 exactly; the clip at max_beta handles the last step.
    with np.errstate(divide="ignore"):
        return _betas_from_alpha_bar(alpha_bar, T, max_beta)


# The discrete schedules by name: a new one is its beta function and its entry here.
_BETA_FNS = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "constant": constant_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}
DISCRETE_SCHEDULES = tuple(_BETA_FNS)


# ---------------------------------------------------------------------------
# The discrete schedule: every table the samplers and losses need.
# ---------------------------------------------------------------------------


class DiscreteSchedule(NamedTuple):
    """Tables of length T + 1 indexed by the paper's t (index 0 = data).

    ``log_snr[0]`` is +inf (alpha_bar_0 = 1); every other entry is finite.
    The posterior tables describe q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7);
    index 0 has no posterior and holds the identity map (x0 coefficient 1,
    variance 0). ``posterior_log_variance_clipped`` replaces the -inf at
    t = 1 by the value at t = 2 (Ho et al.'s code, Nichol & Dhariwal §3.1).
    A NamedTuple of arrays is a pytree, so schedules pass through jit.
    """

    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    log_snr: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef_x0: jax.Array
    posterior_mean_coef_xt: jax.Array

    @property
    def T(self) -> int:
        return self.betas.shape[0] - 1


def tables_from_betas(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All float64 tables from betas[0..T] (betas[0] = 0), in log space."""
    betas = np.asarray(betas, dtype=np.float64)
    log_alphas = np.log1p(-betas)
    log_ab = np.cumsum(log_alphas)                   # log alpha_bar_t
    log_one_minus_ab = np.log(-np.expm1(log_ab[1:]))  # log(1 - alpha_bar_t), t >= 1
    log_snr = np.concatenate([[np.inf], log_ab[1:] - log_one_minus_ab])
    one_minus_ab = np.concatenate([[0.0], np.exp(log_one_minus_ab)])
    # Ho et al. eq. 7, t >= 1: beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t).
    post_var = np.zeros_like(betas)
    post_var[1:] = betas[1:] * one_minus_ab[:-1] / one_minus_ab[1:]
    # The t = 1 posterior has variance 0; use the t = 2 value (beta_1 if T = 1).
    clip = post_var[2] if len(betas) > 2 else betas[1]
    post_logvar = np.log(np.concatenate([[clip, clip], post_var[2:]]))
    coef_x0 = np.ones_like(betas)
    coef_xt = np.zeros_like(betas)
    coef_x0[1:] = betas[1:] * np.exp(0.5 * log_ab[:-1]) / one_minus_ab[1:]
    coef_xt[1:] = np.exp(0.5 * log_alphas[1:]) * one_minus_ab[:-1] / one_minus_ab[1:]
    return dict(
        betas=betas,
        alphas=np.exp(log_alphas),
        alpha_bars=np.exp(log_ab),
        log_snr=log_snr,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef_x0=coef_x0,
        posterior_mean_coef_xt=coef_xt,
    )


def zero_terminal_snr_betas(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Alg. 1:
    shift and scale sqrt(alpha_bar_t) linearly so that sqrt(alpha_bar_T) = 0 (SNR_T = 0, log-SNR
    -inf) while sqrt(alpha_bar_1) keeps its value:

      r_t = (sqrt(ab_t) - sqrt(ab_T)) sqrt(ab_1) / (sqrt(ab_1) - sqrt(ab_T)),   t = 1..T,

    then beta_t = 1 - r_t^2 / r_{t-1}^2, so beta_T = 1. The paper's arrays start at the first
    noisy level; here that is index 1 (index 0 is the data level, alpha_bar_0 = 1, which stays).
    """
    betas = np.asarray(betas, np.float64)
    if betas.shape[0] < 3:
        raise ValueError("zero terminal SNR needs T >= 2 (it keeps alpha_bar_1 and zeroes alpha_bar_T)")
    sqrt_ab = np.exp(0.5 * np.cumsum(np.log1p(-betas)))
    first, last = sqrt_ab[1], sqrt_ab[-1]
    r = np.concatenate([[1.0], (sqrt_ab[1:] - last) * first / (first - last)])
    with np.errstate(divide="ignore"):
        log_r2 = 2.0 * np.log(r)
    return _with_clean_level(-np.expm1(log_r2[1:] - log_r2[:-1]))


def discrete_schedule(name: str, T: int, *, zero_terminal_snr: bool = False, **kwargs) -> DiscreteSchedule:
    """Build the named discrete schedule with T noisy levels (tables of length T + 1).

    Extra keyword arguments go to the beta function (e.g. ``beta=0.02`` for
    "constant", ``s=0.008`` for "cosine", ``rescale=False`` for "linear").
    ``zero_terminal_snr`` rescales it to log_snr[T] = -inf (``zero_terminal_snr_betas``,
    Lin et al. 2024); such a schedule needs a parameterization that identifies x0 at SNR 0
    (v, x0, flow or edm, not eps or score).
    """
    if name not in _BETA_FNS:
        raise ValueError(f"schedule name must be one of {DISCRETE_SCHEDULES}, got {name!r}")
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1, got {T!r}")
    try:
        betas = _BETA_FNS[name](int(T), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for schedule {name!r}: {e}") from None
    if not np.all((betas[1:] > 0) & (betas[1:] < 1)):
        hint = (" (the 1000/T rescaling needs T >= 50; pass rescale=False for shorter chains)"
                if name == "linear" else "")
        raise ValueError(f"schedule {name!r} with T={T} and {kwargs} gives betas outside (0, 1){hint}")
    if not isinstance(zero_terminal_snr, bool):
        raise ValueError(f"zero_terminal_snr must be True or False, got {zero_terminal_snr!r}")
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    with np.errstate(divide="ignore"):
        tables = tables_from_betas(betas)
    return DiscreteSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


class ReverseStepTables(NamedTuple):
    """The step t -> t - 1 read from a discrete schedule's float64-derived tables (each [B]):
    q(x_{t-1} | x_t, x_0) has mean coef_x0 x_0 + coef_xt x_t (Ho et al. eq. 7), and
    (log_var_min, log_var_max) are improved-diffusion's learned_range bounds
    (posterior_log_variance_clipped, log betas); see diffusion.reverse_log_variance_bounds."""

    coef_x0: jax.Array
    coef_xt: jax.Array
    log_var_min: jax.Array
    log_var_max: jax.Array


def reverse_step_tables(schedule: DiscreteSchedule, t) -> ReverseStepTables:
    """``ReverseStepTables`` at integer timesteps t (1..T). Each entry is the float64 value
    rounded once to float32 (the log of a float32 beta adds one more rounding), so the step is
    exact to float32 rounding; the same values rebuilt from float32 log-SNR differences carry
    relative errors up to ~1e-4."""
    return ReverseStepTables(schedule.posterior_mean_coef_x0[t], schedule.posterior_mean_coef_xt[t],
                             schedule.posterior_log_variance_clipped[t], jnp.log(schedule.betas[t]))


def check_timesteps(t, T: int, name: str = "t") -> None:
    """Raise ValueError if concrete integer timesteps are off the grid 1..T.

    Traced arrays are not checked (their values are unknown at trace time).
    """
    if isinstance(t, jax.core.Tracer):
        return
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must hold integer timesteps in 1..{T}, got dtype {t.dtype}")
    if t.size and (t.min() < 1 or t.max() > T):
        raise ValueError(f"{name} must lie on the grid 1..{T}, got values in [{t.min()}, {t.max()}]")


# ---------------------------------------------------------------------------
# Continuous log-SNR schedules, t in [0, 1].
# ---------------------------------------------------------------------------


def cosine_log_snr(t, log_snr_min: float = -20.0, log_snr_max: float = 20.0):
    """Cosine schedule in continuous time: alpha_t = cos(pi t / 2) gives log_snr = -2 log tan(pi t / 2).

    The angle is rescaled so that log_snr(0) = log_snr_max and log_snr(1) =
    log_snr_min (Kingma & Gao 2023, "Understanding diffusion objectives", App. E),
    which keeps both ends finite.

    Near t = 1 the angle approaches pi/2, where tan loses float32 digits; there
    we use log_snr = 2 log tan(pi/2 - theta) with pi/2 - theta computed directly
    from the complementary angles (atan(e^{-x}) + atan(e^{x}) = pi/2).
    """
    a = math.atan(math.exp(-0.5 * log_snr_max))
    b = math.atan(math.exp(-0.5 * log_snr_min))
    a_c = math.atan(math.exp(0.5 * log_snr_max))  # pi/2 - a
    b_c = math.atan(math.exp(0.5 * log_snr_min))  # pi/2 - b
    theta = a + t * (b - a)
    theta_c = b_c + (1.0 - t) * (a_c - b_c)        # pi/2 - theta
    return jnp.where(theta <= 0.25 * math.pi, -2.0 * jnp.log(jnp.tan(theta)),
                     2.0 * jnp.log(jnp.tan(theta_c)))


def vp_linear_log_snr(t, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
    """Song et al. 2021 VP-SDE with beta(tau) linear from beta_min to beta_max, on tau in [t_min, 1].

    alpha^2 = exp(-B(tau)), B(tau) = beta_min tau + (beta_max - beta_min) tau^2 / 2, so
    log_snr = -log(expm1(B(tau))), with tau = t_min + (1 - t_min) t for t in [0, 1]. The SDE's
    log-SNR is +inf at tau = 0; score_sde integrates from eps = 1e-5 (its likelihood and
    samplers' smallest time), which ``t_min`` makes t = 0 of this schedule: log_snr(0) =
    -log(expm1(B(1e-5))) ~ 13.8, a finite data end for the decoder of ``vdm_loss``.
    """
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must lie in (0, 1), got {t_min!r}")
    tau = t_min + (1.0 - t_min) * t
    B = beta_min * tau + 0.5 * (beta_max - beta_min) * tau ** 2
    return -jnp.log(jnp.expm1(B))


def vdm_linear_log_snr(t, log_snr_max: float = 13.3, log_snr_min: float = -5.0):
    """Kingma et al. 2021 fixed linear schedule: gamma(t) = -log_snr linear from -13.3 to 5."""
    return log_snr_max + (log_snr_min - log_snr_max) * t


def flow_log_snr(t):
    """Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024):
    the path x^flow_t = (1 - t) x_0 + t eps has alpha = 1 - t, sigma = t, so

      log_snr(t) = 2 log((1 - t) / t),   +inf at t = 0 and -inf at t = 1 (SNR 0, the prior is exact).

    This library keeps the variance-preserving state x_t = x^flow_t / n_t, n_t = sqrt((1 - t)^2 + t^2),
    which in VP terms is n_t = 1 / (alpha_t + sigma_t): a rescaling by a function of the level
    only, so the flow path is one more log-SNR schedule and every sampler and parameterization
    applies to it (the velocity u = eps - x_0 is the parameterization "flow" of vdm.diffusion).
    """
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))


# The continuous schedules by name: a new one is its log-SNR function and its entry here.
_LOG_SNR_FNS = {
    "cosine": cosine_log_snr,
    "vp_linear": vp_linear_log_snr,
    "vdm_linear": vdm_linear_log_snr,
    "flow": flow_log_snr,
}
CONTINUOUS_SCHEDULES = tuple(_LOG_SNR_FNS)


def continuous_schedule(name: str, **kwargs) -> Callable:
    """The named continuous schedule as a function t -> log_snr(t)."""
    if name not in _LOG_SNR_FNS:
        raise ValueError(f"continuous schedule name must be one of {CONTINUOUS_SCHEDULES}, got {name!r}")
    fn = _LOG_SNR_FNS[name]
    try:
        fn(0.5, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for continuous schedule {name!r}: {e}") from None
    return functools.partial(fn, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def invert_log_snr(log_snr_fn: Callable, log_snr):
    """t in [0, 1] with log_snr_fn(t) = log_snr, by 40 bisections (log_snr_fn is strictly decreasing)."""
    log_snr = jnp.asarray(log_snr, jnp.float32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = log_snr_fn(mid) > log_snr  # the target lies at larger t
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 40, halve, (jnp.zeros_like(log_snr), jnp.ones_like(log_snr)))
    return 0.5 * (lo + hi)


def log_snr_and_derivative(log_snr_fn: Callable, t):
    """(log_snr(t), d log_snr / dt) for an elementwise schedule, by forward-mode AD."""
    t = jnp.asarray(t, dtype=jnp.float32)
    return jax.jvp(log_snr_fn, (t,), (jnp.ones_like(t),))

