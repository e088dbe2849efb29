"""Samplers: pure one-step updates composed by ``lax.scan`` drivers.

Every sampler walks a ``Grid`` of noise levels from the most noisy to the data:
``grid.times`` holds the model's own time (int32 timesteps of a discrete
schedule, float32 t in [0, 1] of a continuous one) and ``grid.log_snr`` the
levels' log-SNR; the last entry is always the data level (time 0, log-SNR +inf).
A step goes from level t to the next level s < t and reads the log-SNR of both,
so strided and respaced chains recompute their variances from the log-SNR table
(``vdm.diffusion.p_mean_variance``, ``q_posterior``) and continuous time works
with any number of steps. The scan body is traced once, so the compile does not
grow with the number of steps; the step arrays are traced arguments.

The samplers (``SAMPLERS``):
  ancestral  Ho et al. 2020 Alg. 2 with any variance type; on a subsequence it is
             Nichol & Dhariwal 2021 §4 respacing; in continuous time the VDM sampler
             (Kingma et al. 2021: p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))).
  ddim       Song et al. 2021 (DDIM) eq. 12 with eta in [0, 1].
  langevin   Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1).
  pc         Predictor-corrector (Song et al. 2021, SDE paper, Alg. 2 / Alg. 5).
  ode        The probability-flow ODE, Euler or Heun (Karras et al. 2022, Alg. 1).
  dpm_solver DPM-Solver++ (Lu et al. 2022), multistep, order 1 (= DDIM), 2 (2M) or 3 (3M).
  edm        Karras et al. 2022 Alg. 2: stochastic churn (S_churn, S_tmin, S_tmax, S_noise) + Heun.
  flow       Euler or Heun on the rectified-flow ODE d x^flow / d tau = u (Liu et al. 2023).
``encode`` integrates the same ODE upwards (DDIM inversion: x_0 -> x_T).

VP and VE. The model sees the variance-preserving x_t = alpha x_0 + sigma eps.
Its data-scaled version y = x_t / alpha = x_0 + (sigma / alpha) eps is the
variance-exploding variable of Song & Ermon and Karras et al., with noise level
sigma_ve = sigma / alpha = exp(-lambda / 2) and score grad_y log q(y) =
-eps_hat / sigma_ve. Langevin dynamics and the ODE are written in y (see
their docstrings); the carried state is always x_t.

Randomness is per example: ``keys`` has one key per example and the noise of
step i for example b comes from ``fold_in(keys[b], i)``, so a sample does not
depend on the batch it was drawn in nor on the number of devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vdm import diffusion
from vdm.schedules import DiscreteSchedule, invert_log_snr

SAMPLERS = ("ancestral", "ddim", "langevin", "pc", "ode", "dpm_solver", "edm", "flow")
SCORE_SAMPLERS = ("langevin", "pc", "ode")
# Samplers written in the VE variable y = x_t / alpha_t, which is infinite at SNR 0.
FINITE_START_SAMPLERS = ("langevin", "pc", "ode", "edm")
DPM_SOLVER_ORDERS = (1, 2, 3)
DISCRETE_SPACINGS = ("linspace", "leading", "trailing", "quadratic", "karras")
CONTINUOUS_SPACINGS = ("linspace", "karras")
ODE_METHODS = ("euler", "heun")
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX = 0.002, 80.0  # Karras et al. 2022, Table 1


# ---------------------------------------------------------------------------
# Grids of noise levels.
# ---------------------------------------------------------------------------


def _check_int(name, value, lo):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def timestep_spacing(T: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """An increasing subsequence of num_steps distinct timesteps of 1..T (int32).

      linspace   round(linspace(T, 1, num_steps)): both ends included (Nichol & Dhariwal 2021 §4)
      leading    1 + k floor(T / num_steps), k = 0..num_steps-1 (DDIM's "uniform", starts at t = 1)
      trailing   round(T - k T / num_steps): ends at T (Lin et al. 2024)
      quadratic  1 + floor(k^2 0.8 T / (num_steps - 1)^2) (DDIM code, "quad"; dense at low noise)
    """
    _check_int("T", T, 1)
    _check_int("num_steps", num_steps, 1)
    if num_steps > T:
        raise ValueError(f"num_steps={num_steps} is more than the T={T} steps of the schedule")
    k = np.arange(num_steps)
    if spacing == "linspace":
        t = np.round(np.linspace(T, 1, num_steps))[::-1]
    elif spacing == "leading":
        t = 1 + k * (T // num_steps)
    elif spacing == "trailing":
        t = np.round(T - k * T / num_steps)[::-1]
    elif spacing == "quadratic":
        t = 1 + np.floor(np.linspace(0.0, np.sqrt(0.8 * T), num_steps) ** 2)
    else:
        raise ValueError(f"spacing must be one of {DISCRETE_SPACINGS[:-1]}, got {spacing!r}")
    t = t.astype(np.int32)
    if np.any(np.diff(t) <= 0):
        raise ValueError(f"{spacing} spacing of {num_steps} steps repeats timesteps of a T={T} "
                         "schedule; use fewer steps or another spacing")
    return t


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..N-1, decreasing from sigma_max to sigma_min (float64). rho = 1 is uniform in sigma."""
    _check_int("num_steps", num_steps, 1)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    frac = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + frac * (b - a)) ** rho


class Grid(NamedTuple):
    """Levels from the most noisy to the data: model times and log-SNR, length num_steps + 1.

    The last entry is the data level: time 0, log-SNR +inf. A pytree, so a grid
    is passed to compiled drivers as traced arrays.
    """

    times: jax.Array
    log_snr: jax.Array


def _sigma_ve(log_snr):
    return np.exp(-0.5 * np.asarray(log_snr, np.float64))


def time_grid(num_steps: int, *, schedule: DiscreteSchedule | None = None,
              log_snr_fn: Callable | None = None, spacing: str = "linspace", rho: float = 7.0,
              sigma_min: float | None = None, sigma_max: float | None = None) -> Grid:
    """The grid of num_steps noisy levels (plus the data level) a sampler visits.

    Discrete ``schedule``: timesteps from ``timestep_spacing``, or with
    spacing="karras" the timesteps whose sigma_ve = exp(-lambda/2) are nearest
    (in log) to the Karras rho-grid (``karras_sigmas``). Continuous ``log_snr_fn``:
    "linspace" is t = i / num_steps, i = num_steps..1 (Kingma et al. 2021); "karras"
    maps the rho-grid to times with ``invert_log_snr``. The Karras grid runs from
    sigma_max down to sigma_min, by default Karras et al.'s 80 and 0.002 (Table 1)
    clipped to the schedule's range: a larger sigma_max adds steps where the ODE
    in sigma is poorly resolved by Heun's rule and the VP prior is already exact.
    """
    if (schedule is None) == (log_snr_fn is None):
        raise ValueError("give exactly one of schedule (a DiscreteSchedule) or log_snr_fn (continuous time)")
    _check_int("num_steps", num_steps, 1)
    if spacing != "karras" and (sigma_min is not None or sigma_max is not None):
        raise ValueError("sigma_min / sigma_max set the Karras grid; they need spacing='karras'")
    if schedule is not None:
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError(f"schedule must be a DiscreteSchedule, got {type(schedule).__name__}")
        if spacing not in DISCRETE_SPACINGS:
            raise ValueError(f"spacing must be one of {DISCRETE_SPACINGS}, got {spacing!r}")
        table = np.asarray(schedule.log_snr, np.float64)
        T = schedule.T
        if spacing != "karras":
            times = timestep_spacing(T, num_steps, spacing)[::-1]
        else:
            if num_steps > T:
                raise ValueError(f"num_steps={num_steps} is more than the T={T} steps of the schedule")
            sig = _karras_range(num_steps, _sigma_ve(table[1]), _sigma_ve(table[T]), sigma_min, sigma_max, rho)
            lam = -2.0 * np.log(sig)
            times = 1 + np.argmin(np.abs(table[None, 1:] - lam[:, None]), axis=1).astype(np.int32)
            if np.any(np.diff(times) >= 0):
                raise ValueError(f"karras spacing of {num_steps} steps repeats timesteps of a T={T} "
                                 "schedule; use fewer steps or another spacing")
        times = np.concatenate([times, [0]]).astype(np.int32)
        return Grid(times, table[times].astype(np.float32))
    if spacing not in CONTINUOUS_SPACINGS:
        raise ValueError(f"spacing must be one of {CONTINUOUS_SPACINGS} for a continuous-time model, "
                         f"got {spacing!r}")
    with jax.ensure_compile_time_eval():  # a grid is host data, also when built inside a trace
        if spacing == "linspace":
            times = np.arange(num_steps, 0, -1, dtype=np.float64) / num_steps
        else:
            ends = np.asarray(log_snr_fn(jnp.asarray([0.0, 1.0], jnp.float32)), np.float64)
            sig = _karras_range(num_steps, _sigma_ve(ends[0]), _sigma_ve(ends[1]), sigma_min, sigma_max, rho)
            times = np.asarray(invert_log_snr(log_snr_fn, -2.0 * np.log(sig)), np.float64)
        times = np.concatenate([times, [0.0]]).astype(np.float32)
        lam = np.asarray(log_snr_fn(jnp.asarray(times[:-1])), np.float32)
    return Grid(times, np.concatenate([lam, [np.inf]]).astype(np.float32))


def _karras_range(num_steps, lo, hi, sigma_min, sigma_max, rho):
    """Karras sigmas between sigma_min and sigma_max (defaults: Table 1, clipped to [lo, hi])."""
    def pick(name, value, default):
        if value is None:
            return float(np.clip(default, lo, hi))
        if not lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6):
            raise ValueError(f"{name}={value} lies outside the schedule's sigma range [{lo:.4g}, {hi:.4g}]")
        return float(value)
    return karras_sigmas(num_steps, pick("sigma_min", sigma_min, KARRAS_SIGMA_MIN),
                         pick("sigma_max", sigma_max, KARRAS_SIGMA_MAX), rho)


def _plan(grid: Grid) -> dict:
    """Per-step scan inputs: step index i, current/next model time t/s and log-SNR."""
    n = grid.times.shape[0] - 1
    return dict(i=jnp.arange(n), t=grid.times[:-1], s=grid.times[1:],
                lam_t=grid.log_snr[:-1], lam_s=grid.log_snr[1:])


# ---------------------------------------------------------------------------
# The model as the samplers see it.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# One-step updates (pure). Levels (t, log-SNR) are scalars: a driver steps the
# whole batch through one level. ``noise`` is a standard normal array like x.
# ---------------------------------------------------------------------------


def ancestral_step(den: Denoiser, x, *, t, log_snr_t, log_snr_s, noise):
    """x_s ~ p(x_s | x_t) = N(mean, exp(log_var)) for s < t: Ho et al. 2020 Alg. 2 line 4 when
    s = t - 1, the respaced step of Nichol & Dhariwal 2021 §4 otherwise (both variance bounds and
    the learned_range interpolation recomputed for t -> s by ``p_mean_variance``). No noise is
    added into the data level (Alg. 2: z = 0 at t = 1). Returns (x_s, x0_hat)."""
    x0, _, var_out = den(x, t, log_snr_t)
    out = x0 if var_out is None else jnp.concatenate([x0, var_out], axis=-1)
    mean, log_var, _ = diffusion.p_mean_variance(out, x, "x0", den.variance_type, log_snr_s=log_snr_s,
                                                 log_snr_t=log_snr_t)
    std = jnp.where(jnp.isinf(log_snr_s), 0.0, jnp.exp(0.5 * log_var))
    return mean + std * noise, x0


def ddim_step(den: Denoiser, x, *, t, log_snr_t, log_snr_s, noise, eta: float = 0.0):
    """DDIM, Song et al. 2021 eq. 12: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - s_eta^2) eps_hat + s_eta z,
    with s_eta^2 = eta^2 Var q(x_s | x_t, x_0) (eq. 16). eta = 1 is the ancestral step with the
    fixed_small variance (same mean and variance); eta = 0 is deterministic and also runs upwards
    (s > t, encoding). sigma_s^2 - s_eta^2 = sigma_s^2 (r + (1 - eta^2)(1 - r)), r = SNR_t/SNR_s,
    is written without cancellation. ``eta`` is a Python float. Returns (x_s, x0_hat)."""
    x0, eps, _ = den(x, t, log_snr_t)
    alpha_s, sigma_s = diffusion.alpha_sigma(log_snr_s)
    if eta == 0:
        return alpha_s * x0 + sigma_s * eps, x0
    _, post_var, _ = diffusion.q_posterior(x0, x, log_snr_s=log_snr_s, log_snr_t=log_snr_t)
    r = jnp.exp(log_snr_t - log_snr_s)
    dir_var = sigma_s ** 2 * (r - (1.0 - eta ** 2) * jnp.expm1(log_snr_t - log_snr_s))
    return alpha_s * x0 + jnp.sqrt(dir_var) * eps + eta * jnp.sqrt(post_var) * noise, x0


def langevin_step(den: Denoiser, x, t, log_snr, step_size, noise):
    """One Langevin step at a fixed level (Song & Ermon 2019, Alg. 1 line 6), taken in the
    data-scaled y = x / alpha whose density is p_data * N(0, sigma_ve^2):

      y <- y + (a / 2) grad_y log q(y) + sqrt(a) z,   grad_y log q(y) = -eps_hat / sigma_ve.

    Returns (x = alpha y, x0_hat)."""
    alpha, _ = diffusion.alpha_sigma(log_snr)
    x0, eps, _ = den(x, t, log_snr)
    y = x / alpha - 0.5 * step_size * eps / jnp.exp(-0.5 * log_snr) + jnp.sqrt(step_size) * noise
    return alpha * y, x0


def _norm(a):
    return jnp.sqrt(jnp.sum(a ** 2, axis=tuple(range(1, a.ndim))))


def corrector_step(den: Denoiser, x, t, log_snr, alpha_step, snr: float, noise, axis_name=None):
    """The Langevin corrector of Song et al. 2021 (SDE paper), Alg. 5 (VP), at level t:

      g = grad log q(x_t) = -eps_hat / sigma_t,  e = 2 alpha_i (r ||z|| / ||g||)^2,
      x <- x + e g + sqrt(2 e) z,

    with alpha_i = alpha_t^2 / alpha_s^2 of the step t -> s (1 - beta_t for s = t - 1) and the
    target signal-to-noise ratio r = ``snr``. As in the paper's code, ||z|| and ||g|| are
    per-example norms averaged over the batch (per-example ratios are heavy-tailed in low
    dimension: g vanishes at the modes); ``axis_name`` averages over all devices too, so
    the step does not depend on how the batch is split. Returns (x, x0_hat)."""
    _, sigma = diffusion.alpha_sigma(log_snr)
    x0, eps, _ = den(x, t, log_snr)
    g = -eps / sigma
    norms = jnp.stack([jnp.mean(_norm(noise)), jnp.mean(_norm(g))])
    if axis_name is not None:
        norms = lax.pmean(norms, axis_name)
    e = 2.0 * alpha_step * (snr * norms[0] / norms[1]) ** 2
    return x + e * g + jnp.sqrt(2.0 * e) * noise, x0


def ode_step(den: Denoiser, x, *, t, log_snr_t, s, log_snr_s, method: str = "euler"):
    """One step t -> s of the probability-flow ODE in y = x / alpha, sigma = sigma_ve = exp(-lambda/2):

      dy / dsigma = eps_hat(alpha y, sigma)

    (Karras et al. 2022 eqs. 1 and 3 with sigma(t) = t: dy/dsigma = (y - D(y; sigma)) / sigma; Song
    et al. 2021, DDIM eq. 14). "euler": y_s = y_t + (sigma_s - sigma_t) d_t, which is DDIM with
    eta = 0; "heun": Karras Alg. 1 lines 4-8, the trapezoid with the slope re-evaluated at s, except
    into the data level (sigma_s = 0), where Alg. 1 takes the Euler step. Runs either direction.
    Heun's rule needs grids with bounded sigma ratios (the Karras grid): a single step across
    orders of magnitude of sigma (a uniform t-grid on a schedule reaching log-SNR -20) is
    unstable, while Euler (DDIM) stays exact for the part of eps_hat linear in y.
    Returns (x_s = alpha_s y_s, x0_hat)."""
    alpha_t, _ = diffusion.alpha_sigma(log_snr_t)
    alpha_s, _ = diffusion.alpha_sigma(log_snr_s)
    h = jnp.exp(-0.5 * log_snr_s) - jnp.exp(-0.5 * log_snr_t)
    y = x / alpha_t
    x0, d, _ = den(x, t, log_snr_t)
    y_s = y + h * d
    if method == "heun":
        def correct():
            _, d_s, _ = den(alpha_s * y_s, s, log_snr_s)
            return y + 0.5 * h * (d + d_s)
        y_s = lax.cond(jnp.isinf(log_snr_s), lambda: y_s, correct)
    return alpha_s * y_s, x0


def dpm_solver_step(den: Denoiser, x, *, t, log_snr_t, log_snr_s, history, order):
    """One step t -> s of multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Alg. 2 and the
    official code's multistep_dpm_solver_{first,second,third}_update, data prediction), in the
    half log-SNR lambda = log(alpha / sigma), h = lambda_s - lambda_t, phi_1 = expm1(-h):

      order 1:  x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 m0                       (= DDIM)
      order 2:  ... - 0.5 alpha_s phi_1 D1_0,  D1_0 = (m0 - m1) / r0                   (2M)
      order 3:  ... + alpha_s phi_2 D1 - alpha_s phi_3 D2 in place of the order-2 term (3M),
                D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
                phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2,

    where m0 = x0_hat at t and ``history = ((m1, lambda_1), (m2, lambda_2))`` holds x0_hat at the two
    previous levels, r0 = (lambda_t - lambda_1) / h, r1 = (lambda_1 - lambda_2) / h. ``order`` (traced)
    is this step's order; the driver lowers it for warm-up and the final step. sigma_s / sigma_t is
    taken in logs, so a first level at SNR 0 (sigma_t = 1, h = inf) and the last step into the data
    (h = inf: x_0 = m0) are exact. Returns (x_s, x0_hat)."""
    x0, _, _ = den(x, t, log_snr_t)
    (m1, lam_1), (m2, lam_2) = history
    alpha_s, _ = diffusion.alpha_sigma(log_snr_s)
    h = 0.5 * (log_snr_s - log_snr_t)
    sigma_ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-log_snr_s) - jax.nn.log_sigmoid(-log_snr_t)))
    phi_1 = jnp.expm1(-h)
    x_s = sigma_ratio * x - alpha_s * phi_1 * x0
    r0 = jnp.where(order >= 2, 0.5 * (log_snr_t - lam_1) / h, 1.0)
    r1 = jnp.where(order >= 3, 0.5 * (lam_1 - lam_2) / h, 1.0)
    d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
    second = -0.5 * alpha_s * phi_1 * d1_0
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    third = alpha_s * phi_2 * d1 - alpha_s * phi_3 * d2
    return x_s + jnp.where(order == 2, second, jnp.where(order == 3, third, 0.0)), x0


def edm_step(den: Denoiser, x, *, t, log_snr_t, s, log_snr_s, noise, gamma, S_noise: float,
             time_of: Callable):
    """One step of Karras et al. 2022 Alg. 2 (lines 4-10) in y = x / alpha, sigma = exp(-lambda / 2):

      sigma_hat = (1 + gamma) sigma_t,  y_hat = y + sqrt(sigma_hat^2 - sigma_t^2) S_noise z,

    then the Heun step sigma_hat -> sigma_s (``ode_step``; Euler into the data level). ``time_of``
    maps a log-SNR to the nearest level the model knows, (model time, its log-SNR) (NVlabs'
    ``round_sigma``: a discrete schedule's nearest table entry); gamma = 0 stays at (t, lambda_t).
    Returns (x_s, x0_hat)."""
    t_hat, lam_hat = time_of(log_snr_t - 2.0 * jnp.log1p(gamma))
    t_hat = jnp.where(gamma > 0, t_hat, t).astype(jnp.asarray(t).dtype)
    lam_hat = jnp.where(gamma > 0, lam_hat, log_snr_t)
    alpha_t, _ = diffusion.alpha_sigma(log_snr_t)
    alpha_hat, _ = diffusion.alpha_sigma(lam_hat)
    extra_var = jnp.maximum(jnp.exp(-lam_hat) - jnp.exp(-log_snr_t), 0.0)
    y_hat = x / alpha_t + jnp.sqrt(extra_var) * S_noise * noise
    return ode_step(den, alpha_hat * y_hat, t=t_hat, log_snr_t=lam_hat, s=s, log_snr_s=log_snr_s, method="heun")


def flow_step(den: Denoiser, x, *, t, log_snr_t, s, log_snr_s, method: str = "euler"):
    """One step t -> s of the rectified-flow ODE d z / d tau = u(z, tau), u = E[eps - x_0 | z]
    (Liu et al. 2023; Lipman et al. 2023), in the flow state z = x / (alpha + sigma) and time
    tau = sigmoid(-lambda / 2), where z = (1 - tau) x_0 + tau eps (``vdm.diffusion.flow_scale``):
    "euler" z_s = z_t + (tau_s - tau_t) u_t, which is DDIM (eta = 0) on any schedule; "heun" the
    trapezoid with u re-evaluated at s, Euler into the data level (tau_s = 0) as Karras Alg. 1.
    Finite at SNR 0 (tau = 1, z = x). Returns (x_s, x0_hat)."""
    n_t, n_s = diffusion.flow_scale(log_snr_t), diffusion.flow_scale(log_snr_s)
    dtau = jax.nn.sigmoid(-0.5 * log_snr_s) - jax.nn.sigmoid(-0.5 * log_snr_t)
    x0, eps, _ = den(x, t, log_snr_t)
    z = n_t * x
    u = eps - x0
    z_s = z + dtau * u
    if method == "heun":
        def correct():
            x0_s, eps_s, _ = den(z_s / n_s, s, log_snr_s)
            return z + 0.5 * dtau * (u + eps_s - x0_s)
        z_s = lax.cond(jnp.isinf(log_snr_s), lambda: z_s, correct)
    return z_s / n_s, x0


# ---------------------------------------------------------------------------
# The scan driver.
# ---------------------------------------------------------------------------


class Trajectory(NamedTuple):
    """The state x_s (VP units) and the prediction x0_hat after every k-th step and the last:
    ``times[j]`` is the level x[j] sits at; x and x0 have shape [n_records, *x.shape]."""

    times: jax.Array
    x: jax.Array
    x0: jax.Array


def _normal(keys, x, i, j=None):
    """Per-example standard normals shaped like x: example b uses fold_in(keys[b], i) (then j)."""
    def one(k):
        k = jax.random.fold_in(k, i)
        return jax.random.normal(k if j is None else jax.random.fold_in(k, j), x.shape[1:], x.dtype)
    return jax.vmap(one)(keys)


def _drive(step, x, plan: dict, grid: Grid, every: int | None, state=None):
    """Run ``step(x, inputs) -> (x, x0_hat)`` over the leading axis of ``plan`` with lax.scan.

    With ``every`` = k the steps run in chunks of k (an outer scan over an inner
    one, the last chunk padded with no-op steps) and the state after each chunk
    is kept; without it nothing per step is kept, so memory does not grow with
    the number of steps. A multistep solver passes its memory as ``state`` (a
    pytree); the carry is then (x, state) and ``step((x, state), inputs) ->
    ((x, state), x0_hat)``. Returns (x, Trajectory or None).
    """
    first = (lambda c: c) if state is None else (lambda c: c[0])
    x_init = x
    x = x if state is None else (x, state)
    if every is None:
        x, _ = lax.scan(lambda c, inp: (step(c, inp)[0], None), x, plan)
        return first(x), None
    n = grid.times.shape[0] - 1
    n_rec = -(-n // every)
    idx = np.minimum(np.arange(n_rec * every), n - 1)
    chunks = jax.tree.map(lambda a: a[idx].reshape((n_rec, every) + a.shape[1:]), plan)
    valid = (np.arange(n_rec * every) < n).reshape(n_rec, every)

    def inner(carry, inputs):
        inp, ok = inputs
        x_new, x0_new = step(carry[0], inp)
        keep = jax.tree.map(lambda a, b: jnp.where(ok, a, b), x_new, carry[0])
        return (keep, jnp.where(ok, x0_new, carry[1])), None

    def outer(carry, chunk):
        carry, _ = lax.scan(inner, carry, chunk)
        return carry, (first(carry[0]), carry[1])

    (x, _), (xs, x0s) = lax.scan(outer, (x, jnp.zeros_like(x_init)), (chunks, valid))
    times = grid.times[np.minimum(np.arange(1, n_rec + 1) * every, n)]
    return first(x), Trajectory(times, xs, x0s)


def _check_every(every):
    if every is not None:
        _check_int("trajectory_every", every, 1)


# ---------------------------------------------------------------------------
# Samplers: (den, x_T, keys, grid) -> (x_0, Trajectory or None). Traceable (jit, pmap).
# x_T is the VP prior sample N(0, I); keys holds one key per example.
# ---------------------------------------------------------------------------


def ancestral(den: Denoiser, x_T, keys, grid: Grid, *, trajectory_every=None):
    """Ancestral sampling x_T -> ... -> x_0 with ``ancestral_step`` on every grid step:
    Ho et al. 2020 Alg. 2 on the full grid; respaced (Nichol & Dhariwal §4) on a subsequence;
    the VDM sampler (Kingma et al. 2021) on a continuous grid, any number of steps. ``learned`` (a free
    log-variance) is the variance of one step t -> t-1 and needs the full discrete grid."""
    _check_every(trajectory_every)

    def step(x, p):
        return ancestral_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"],
                              noise=_normal(keys, x, p["i"]))

    return _drive(step, x_T, _plan(grid), grid, trajectory_every)


def ddim(den: Denoiser, x_T, keys, grid: Grid, *, eta: float = 0.0, trajectory_every=None):
    """DDIM (Song et al. 2021) on the grid with ``ddim_step``; keys may be None when eta = 0."""
    _check_options("ddim", dict(eta=eta))
    _check_every(trajectory_every)

    def step(x, p):
        noise = 0.0 if eta == 0 else _normal(keys, x, p["i"])
        return ddim_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"], noise=noise, eta=eta)

    return _drive(step, x_T, _plan(grid), grid, trajectory_every)


def annealed_langevin(den: Denoiser, x_T, keys, grid: Grid, *, steps_per_level: int = 100,
                      step_size: float = 2e-5, denoise: bool = True, trajectory_every=None):
    """Annealed Langevin dynamics, Song & Ermon 2019 Alg. 1, on the grid's noisy levels.

    VP mapping: Alg. 1 runs in y = x_t / alpha_t, the VE variable whose density at
    level i is p_data * N(0, sigma_i^2) with sigma_i = sigma_ve = exp(-lambda_i / 2)
    (``langevin_step``); y is carried unchanged from one level to the next, as in
    Alg. 1 (so x_t is rescaled by alpha_{i+1} / alpha_i). The step size is
    a_i = step_size * sigma_i^2 / sigma_L^2 (Alg. 1 line 3; sigma_L = the last,
    least noisy level), ``steps_per_level`` steps per level. x_T ~ N(0, I) is the VP
    prior at the first level. With ``denoise`` the output is the Tweedie denoiser
    E[x_0 | y] = y - sigma_L eps_hat at the last level (Song et al. 2021 SDE code;
    Jolicoeur-Martineau et al. 2021), else y itself (noise sigma_L left in).

    Choosing the levels: step_size = 2e-5 is Song & Ermon's for sigma_L = 0.01 on
    images. The last levels equilibrate only if steps_per_level * a_i reaches the
    data's local variance; for unit-variance modes use a larger sigma_L, e.g. the
    Karras grid with sigma_min = 0.1 and step_size = 0.005 (scripts/sampler_accuracy.py).
    """
    _check_options("langevin", dict(steps_per_level=steps_per_level, step_size=step_size, denoise=denoise))
    _check_every(trajectory_every)
    plan = _plan(grid)
    plan["a"] = step_size * jnp.exp(plan["lam_t"][-1] - plan["lam_t"])

    def step(x, p):
        def inner(x, j):
            noise = _normal(keys, x, p["i"], j)
            return langevin_step(den, x, p["t"], p["lam_t"], p["a"], noise)[0], None

        x, _ = lax.scan(inner, x, jnp.arange(steps_per_level))
        alpha_t, _ = diffusion.alpha_sigma(p["lam_t"])
        alpha_s, _ = diffusion.alpha_sigma(p["lam_s"])
        x0, _, _ = den(x, p["t"], p["lam_t"])
        last = jnp.isinf(p["lam_s"]) & denoise
        return jnp.where(last, x0, alpha_s * x / alpha_t), x0

    return _drive(step, x_T, plan, grid, trajectory_every)


def predictor_corrector(den: Denoiser, x_T, keys, grid: Grid, *, corrector_steps: int = 1,
                        snr: float = 0.16, trajectory_every=None, axis_name=None):
    """Predictor-corrector sampling (Song et al. 2021, SDE paper, Alg. 2): at each level t,
    ``corrector_steps`` Langevin corrector steps (``corrector_step``, Alg. 5) then the reverse
    (ancestral) predictor step t -> s (``ancestral_step``; Song et al.'s ancestral predictor is its
    fixed_large case). Corrector-then-predictor is the order of the paper's code, so the data level
    is never corrected. ``axis_name``: the pmap axis the corrector's norms are averaged over."""
    _check_options("pc", dict(corrector_steps=corrector_steps, snr=snr))
    _check_every(trajectory_every)

    def step(x, p):
        alpha_step = jnp.exp(jax.nn.log_sigmoid(p["lam_t"]) - jax.nn.log_sigmoid(p["lam_s"]))

        def inner(x, j):
            noise = _normal(keys, x, p["i"], j + 1)
            return corrector_step(den, x, p["t"], p["lam_t"], alpha_step, snr, noise, axis_name)[0], None

        x, _ = lax.scan(inner, x, jnp.arange(corrector_steps))
        # The predictor's noise is stream 0 of fold_in(key, i); corrector step j uses stream j + 1.
        return ancestral_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"],
                              noise=_normal(keys, x, p["i"], 0))

    return _drive(step, x_T, _plan(grid), grid, trajectory_every)


def probability_flow(den: Denoiser, x_T, keys, grid: Grid, *, method: str = "heun",
                     trajectory_every=None):
    """Deterministic sampling with the probability-flow ODE (``ode_step``, Karras et al. 2022
    Alg. 1) from x_T ~ N(0, I) along the grid (Karras rho-grid with spacing="karras"). Euler costs
    one model call per step, Heun two (one on the last step). ``keys`` is unused."""
    _check_options("ode", dict(method=method))
    _check_every(trajectory_every)

    def step(x, p):
        return ode_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"], method=method)

    return _drive(step, x_T, _plan(grid), grid, trajectory_every)


def encode(den: Denoiser, x0, grid: Grid, *, method: str = "euler"):
    """Deterministic encoding x_0 -> x_T by the probability-flow ODE run upwards through the
    grid's levels (method "euler" is DDIM inversion, Song et al. 2021 §4.3 / §5.4). Its first step,
    from the data level to the least noisy level t_1, inverts the last decoding step
    x_0 = (x_1 - sigma_1 eps_hat(x_1)) / alpha_1 with eps_hat evaluated at alpha_1 x_0:
    x_1 = alpha_1 x_0 + sigma_1 eps_hat(alpha_1 x_0). Decoding with ``ddim`` (eta = 0) or
    ``probability_flow`` on the same grid returns x_0 up to discretization error."""
    _check_options("ode", dict(method=method))
    times, lam = grid.times[-2::-1], grid.log_snr[-2::-1]   # increasing noise, data level dropped
    alpha_1, sigma_1 = diffusion.alpha_sigma(lam[0])
    _, eps, _ = den(alpha_1 * x0, times[0], lam[0])
    x = alpha_1 * x0 + sigma_1 * eps
    up = dict(t=times[:-1], s=times[1:], lam_t=lam[:-1], lam_s=lam[1:])
    x, _ = lax.scan(lambda x, p: (ode_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"],
                                                  log_snr_s=p["lam_s"], method=method)[0], None),
                    x, up)
    return x


def dpm_solver_orders(num_steps: int, order: int) -> np.ndarray:
    """The order of each step of multistep DPM-Solver++ (official code, lower_order_final): step i
    (0-based) uses min(order, i + 1) (warm-up from the first order), with fewer than 10 steps also
    min(., num_steps - i); the last step, into the data level (h = inf), is always first order."""
    i = np.arange(num_steps)
    orders = np.minimum(order, i + 1)
    if num_steps < 10:
        orders = np.minimum(orders, num_steps - i)
    orders[-1] = 1
    return orders.astype(np.int32)


def dpm_solver(den: Denoiser, x_T, keys, grid: Grid, *, order: int = 2, trajectory_every=None):
    """Multistep DPM-Solver++ (Lu et al. 2022) of the given ``order`` along the grid with
    ``dpm_solver_step``: one model call per step, the last two x0_hat carried in the scan.
    order 1 is DDIM (eta = 0). ``keys`` is unused."""
    _check_options("dpm_solver", dict(order=order))
    _check_every(trajectory_every)
    plan = _plan(grid)
    n = plan["i"].shape[0]
    plan["order"] = jnp.asarray(dpm_solver_orders(n, order))
    plan["lam_1"] = grid.log_snr[np.maximum(np.arange(n) - 1, 0)]
    plan["lam_2"] = grid.log_snr[np.maximum(np.arange(n) - 2, 0)]

    def step(carry, p):
        x, (m1, m2) = carry
        history = ((m1, p["lam_1"]), (m2, p["lam_2"]))
        x_s, x0 = dpm_solver_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"],
                                    history=history, order=p["order"])
        return (x_s, (x0, m1)), x0

    zeros = jnp.zeros_like(x_T)
    return _drive(step, x_T, plan, grid, trajectory_every, state=(zeros, zeros))


def edm_sampler(den: Denoiser, x_T, keys, grid: Grid, *, time_of: Callable, S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0,
                trajectory_every=None):
    """The stochastic sampler of Karras et al. 2022, Alg. 2 (NVlabs/edm generate.py), with
    ``edm_step`` on the grid (the rho = 7 grid with spacing="karras"): at each level with
    S_tmin <= sigma_t <= S_tmax, gamma = min(S_churn / N, sqrt(2) - 1) for N steps, else 0.
    S_churn = 0 is the deterministic Heun sampler (``probability_flow``, Alg. 1). 2N - 1 model
    calls. ``time_of`` maps a log-SNR to the nearest model level (``_time_of``)."""
    opts = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    _check_options("edm", opts)
    _check_every(trajectory_every)
    plan = _plan(grid)
    gamma_max = min(S_churn / plan["i"].shape[0], np.sqrt(2.0) - 1.0)

    def step(x, p):
        sigma_t = jnp.exp(-0.5 * p["lam_t"])
        gamma = jnp.where((sigma_t >= S_tmin) & (sigma_t <= S_tmax), gamma_max, 0.0)
        return edm_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"],
                        noise=_normal(keys, x, p["i"]), gamma=gamma, S_noise=S_noise, time_of=time_of)

    return _drive(step, x_T, plan, grid, trajectory_every)


def flow_sampler(den: Denoiser, x_T, keys, grid: Grid, *, method: str = "euler", trajectory_every=None):
    """Deterministic sampling of the rectified-flow ODE with ``flow_step`` (Euler: one model call
    per step, the flow-matching sampler of Lipman et al. / Esser et al. on the uniform t-grid of the
    "flow" schedule; Heun: two, one on the last step). ``keys`` is unused."""
    _check_options("flow", dict(method=method))
    _check_every(trajectory_every)

    def step(x, p):
        return flow_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"], method=method)

    return _drive(step, x_T, _plan(grid), grid, trajectory_every)


def _time_of(levels) -> Callable:
    """log-SNR -> (model time, log-SNR of that time) for ``edm_step``. ``levels`` is
    ("discrete", log-SNR table as a tuple): the nearest table entry t in 1..T; or
    ("continuous", log_snr_fn): t = log_snr_fn^{-1}(lambda) by bisection."""
    kind, value = levels
    if kind == "discrete":
        table = jnp.asarray(value, jnp.float32)

        def nearest(lam):
            t = 1 + jnp.argmin(jnp.abs(table[1:] - lam)).astype(jnp.int32)
            return t, table[t]
        return nearest

    def invert(lam):
        t = invert_log_snr(value, lam)
        return t, value(t)
    return invert


_SAMPLER_FNS = {
    "ancestral": (ancestral, {}),
    "ddim": (ddim, {"eta": 0.0}),
    "langevin": (annealed_langevin, {"steps_per_level": 100, "step_size": 2e-5, "denoise": True}),
    "pc": (predictor_corrector, {"corrector_steps": 1, "snr": 0.16}),
    "ode": (probability_flow, {"method": "heun"}),
    "dpm_solver": (dpm_solver, {"order": 2}),
    "edm": (edm_sampler, {"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.0}),
    "flow": (flow_sampler, {"method": "euler"}),
}


def num_evaluations(sampler: str, num_steps: int, options: dict | None = None) -> int:
    """Network evaluations (NFE) of ``sample`` with ``num_steps`` levels: one per step, 2n - 1 for the
    Heun-type samplers (no correction into the data level), langevin n (steps_per_level + 1),
    pc n (corrector_steps + 1)."""
    opts = check_options(sampler, options or {})
    if sampler == "edm" or (sampler in ("ode", "flow") and opts["method"] == "heun"):
        return 2 * num_steps - 1
    if sampler == "langevin":
        return num_steps * (opts["steps_per_level"] + 1)
    if sampler == "pc":
        return num_steps * (opts["corrector_steps"] + 1)
    return num_steps


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_options(sampler: str, options: dict) -> dict:
    """The sampler's options with its defaults filled in; ValueError for an unknown sampler or
    option, or a bad value (``sample.options`` of a config is checked with this)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    _, defaults = _SAMPLER_FNS[sampler]
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for sampler {sampler!r}; "
                         f"its options are {sorted(defaults)}")
    opts = {**defaults, **options}
    _check_options(sampler, opts)
    return opts


def _check_options(sampler, opts):
    """ValueError for a bad sampler option (the keys are the sampler's own, see _SAMPLER_FNS)."""
    if sampler == "ddim":
        eta = opts["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    elif sampler == "langevin":
        _check_int("steps_per_level", opts["steps_per_level"], 1)
        if not opts["step_size"] > 0:
            raise ValueError(f"step_size must be > 0, got {opts['step_size']!r}")
        if not isinstance(opts["denoise"], bool):
            raise ValueError(f"denoise must be True or False, got {opts['denoise']!r}")
    elif sampler == "pc":
        _check_int("corrector_steps", opts["corrector_steps"], 1)
        if not opts["snr"] > 0:
            raise ValueError(f"snr must be > 0, got {opts['snr']!r}")
    elif sampler in ("ode", "flow") and opts["method"] not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}, got {opts['method']!r}")
    elif sampler == "dpm_solver":
        order = opts["order"]
        if isinstance(order, bool) or order not in DPM_SOLVER_ORDERS:
            raise ValueError(f"order (of DPM-Solver++) must be one of {DPM_SOLVER_ORDERS} "
                             f"(1 = DDIM, 2 = 2M, 3 = 3M), got {order!r}")
    elif sampler == "edm":
        for name in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
            if not _number(opts[name]):
                raise ValueError(f"{name} must be a number, got {opts[name]!r}")
        if not opts["S_churn"] >= 0:
            raise ValueError(f"S_churn must be >= 0 (Karras et al. 2022, Alg. 2), got {opts['S_churn']!r}")
        if not 0 <= opts["S_tmin"] <= opts["S_tmax"]:
            raise ValueError(f"need 0 <= S_tmin <= S_tmax, got S_tmin={opts['S_tmin']!r}, "
                             f"S_tmax={opts['S_tmax']!r}")
        if not opts["S_noise"] > 0:
            raise ValueError(f"S_noise must be > 0, got {opts['S_noise']!r}")


# ---------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Front door: validate on the host, then one compiled driver (jit or pmap).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a sampling run (hashable: the jit/pmap cache key)."""

    sampler: str
    shape: tuple
    den: tuple  # (parameterization, variance_type, clip_x0, threshold, sigma_data)
    options: tuple
    levels: tuple  # ("discrete", log-SNR table) or ("continuous", log_snr_fn), for ``_time_of``
    conditional: bool
    guidance_scale: float | None
    null_label: int | None
    trajectory_every: int | None


def _prepare(shape, sampler, schedule, log_snr_fn, num_steps, spacing, rho, sigma_min, sigma_max,
             parameterization, variance_type, clip_x0, threshold, labels, guidance_scale, null_label,
             trajectory_every, options, sigma_data=diffusion.EDM_SIGMA_DATA):
    """All checks, before anything is traced; returns (_Spec, Grid)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if (schedule is None) == (log_snr_fn is None):
        raise ValueError("give exactly one of schedule (a DiscreteSchedule) or log_snr_fn (continuous time)")
    if sampler in SCORE_SAMPLERS and parameterization not in diffusion.PARAMETERIZATIONS:
        raise ValueError(f"sampler {sampler!r} needs the score grad log q(x_t) = -eps_hat / sigma_t, which a "
                         f"model gives through a parameterization in {diffusion.PARAMETERIZATIONS}; "
                         f"got {parameterization!r}")
    den = Denoiser(None, parameterization, variance_type, clip_x0, threshold, float(sigma_data))
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *example_shape) with positive sizes, got {shape}")
    opts = check_options(sampler, options)
    _check_every(trajectory_every)
    if num_steps is None:
        if schedule is None:
            raise ValueError("num_steps is required for a continuous-time model (log_snr_fn)")
        num_steps = getattr(schedule, "T", None)
    grid = time_grid(num_steps, schedule=schedule, log_snr_fn=log_snr_fn, spacing=spacing, rho=rho,
                     sigma_min=sigma_min, sigma_max=sigma_max)
    check_zero_snr_start(grid, sampler, parameterization)
    if variance_type == "learned" and sampler in ("ancestral", "pc"):
        full = schedule is not None and np.array_equal(grid.times[:-1], np.arange(schedule.T, 0, -1))
        if not full:
            raise ValueError("variance_type 'learned' is the log-variance of one step t -> t-1 and cannot be "
                             "respaced or used in continuous time; use all T steps or learned_range")
    if guidance_scale is not None and (labels is None or null_label is None):
        raise ValueError("guidance_scale needs labels and null_label (classifier-free guidance)")
    if labels is not None and np.shape(labels) != shape[:1]:
        raise ValueError(f"labels must have shape {shape[:1]} (one per example), got {np.shape(labels)}")
    levels = (("discrete", tuple(np.asarray(schedule.log_snr, np.float32).tolist())) if schedule is not None
              else ("continuous", log_snr_fn))
    spec = _Spec(sampler, shape[1:], (den.parameterization, den.variance_type, den.clip_x0, den.threshold,
                                      den.sigma_data),
                 tuple(sorted(opts.items())), levels if sampler == "edm" else None, labels is not None,
                 None if guidance_scale is None else float(guidance_scale),
                 None if null_label is None else int(null_label), trajectory_every)
    return spec, grid


def check_zero_snr_start(grid: Grid, sampler: str, parameterization: str) -> None:
    """ValueError when the grid starts at SNR 0 (log-SNR -inf: the "flow" schedule's t = 1, a
    zero-terminal-SNR table's T) and the model or sampler cannot take that first step."""
    if not np.isneginf(np.asarray(grid.log_snr)[0]):
        return
    if parameterization in ("eps", "score"):
        raise ValueError(f"the grid starts at SNR 0 (log-SNR -inf), where x0 = (x_t - sigma eps) / alpha is 0/0: "
                         f"parameterization {parameterization!r} cannot be sampled from there (Lin et al. 2024, "
                         "§3.2); use 'v', 'x0', 'flow' or 'edm', or a schedule with a finite terminal log-SNR")
    if sampler in FINITE_START_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} works in y = x_t / alpha_t, infinite at the grid's first level "
                         "(SNR 0, log-SNR -inf); use spacing='karras' (a finite sigma_max), or a sampler that "
                         "starts at SNR 0: 'ancestral', 'ddim', 'dpm_solver' or 'flow'")


def _run(model_fn, spec: _Spec, grid: Grid, keys, labels, params=None, axis_name=None):
    """Draw x_T from the per-example keys and run the sampler (traced by jit or pmap)."""
    if params is not None:
        model_fn = functools.partial(model_fn, params)
    if spec.guidance_scale is not None:
        model_fn = classifier_free_guidance(model_fn, labels, spec.guidance_scale, spec.null_label,
                                            spec.den[1])
    elif spec.conditional:
        model_fn = functools.partial(_with_labels, model_fn, labels)
    den = Denoiser(model_fn, *spec.den)
    k_init, k_steps = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    x_T = jax.vmap(lambda k: jax.random.normal(k, spec.shape))(k_init)
    fn, _ = _SAMPLER_FNS[spec.sampler]
    options = dict(spec.options, **({"axis_name": axis_name} if spec.sampler == "pc" else {}),
                   **({"time_of": _time_of(spec.levels)} if spec.sampler == "edm" else {}))
    return fn(den, x_T, k_steps, grid, trajectory_every=spec.trajectory_every, **options)


def _with_labels(model_fn, labels, x, t):
    return model_fn(x, t, labels)


_run_jit = jax.jit(_run, static_argnums=(0, 1))
def _run_sharded(model_fn, spec: _Spec, grid: Grid, keys, labels, params):
    return _run(model_fn, spec, grid, keys, labels, params, axis_name="batch")


# in_axes spells out Grid(None, None): with a bare None, jax's flat-args fast path can mis-assign
# axes when the leaf count happens to equal the argument count (labels=None).
_run_pmap = jax.pmap(_run_sharded, axis_name="batch", in_axes=(None, None, Grid(None, None), 0, 0, None),
                     static_broadcasted_argnums=(0, 1))


def sample(model_fn: Callable, key, shape, *, sampler: str = "ancestral",
           schedule: DiscreteSchedule | None = None, log_snr_fn: Callable | None = None,
           num_steps: int | None = None, spacing: str = "linspace", rho: float = 7.0,
           sigma_min: float | None = None, sigma_max: float | None = None,
           parameterization: str = "eps", variance_type: str = "fixed_small", clip_x0=None,
           threshold: float | None = None, labels=None, guidance_scale: float | None = None,
           null_label: int | None = None, trajectory_every: int | None = None, pmap: bool = False,
           params=None, sigma_data: float = diffusion.EDM_SIGMA_DATA, **options):
    """Draw ``shape[0]`` samples of shape ``shape[1:]`` with the named sampler (one compile).

    model_fn(x_t, t) -> output, t of shape [B] in the model's own time (int 1..T with
    ``schedule``, float in [0, 1] with ``log_snr_fn``). With ``labels`` the model is
    model_fn(x_t, t, labels); with ``guidance_scale`` w too it is guided
    (``classifier_free_guidance``, null class ``null_label``). ``num_steps`` noisy
    levels (default T) spaced by ``spacing`` (``time_grid``). ``options`` are the
    sampler's own: ddim eta; langevin steps_per_level, step_size, denoise; pc
    corrector_steps, snr; ode and flow method; dpm_solver order; edm S_churn, S_tmin,
    S_tmax, S_noise. ``sigma_data`` is the "edm" parameterization's.

    The key is split into one key per example, which draws that example's x_T and
    step noise. With ``pmap`` the batch is spread over all local devices
    (shape[0] must divide evenly); the result equals the single-device one for any
    device count (up to float rounding). The compile is cached on (model_fn,
    settings, shapes): reuse the same model_fn object. With ``params``, the model is
    model_fn(params, x_t, t) and params a traced argument, so one compile serves every
    parameter value (a training run's successive EMA parameters). Returns the samples, or
    (samples, Trajectory) with ``trajectory_every``.
    """
    spec, grid = _prepare(shape, sampler, schedule, log_snr_fn, num_steps, spacing, rho, sigma_min,
                          sigma_max, parameterization, variance_type, clip_x0, threshold, labels,
                          guidance_scale, null_label, trajectory_every, options, sigma_data)
    keys = jax.random.split(key, shape[0])
    labels = None if labels is None else jnp.asarray(labels)
    if not pmap:
        x, traj = _run_jit(model_fn, spec, grid, keys, labels, params)
        return x if trajectory_every is None else (x, traj)
    n_dev = jax.local_device_count()
    if shape[0] % n_dev:
        raise ValueError(f"shape[0]={shape[0]} must be divisible by the {n_dev} local devices")
    shard = lambda a: None if a is None else a.reshape((n_dev, shape[0] // n_dev) + a.shape[1:])
    x, traj = _run_pmap(model_fn, spec, grid, shard(keys), shard(labels), params)
    x = x.reshape(tuple(shape))
    if trajectory_every is None:
        return x
    merge = lambda a: jnp.moveaxis(a, 0, 1).reshape((a.shape[1], shape[0]) + a.shape[3:])
    return x, Trajectory(traj.times[0], merge(traj.x), merge(traj.x0))


def pmap_sample(model_fn: Callable, key, shape, **kwargs):
    """``sample(..., pmap=True)``: the batch spread over all local devices with ``jax.pmap``."""
    return sample(model_fn, key, shape, pmap=True, **kwargs)
