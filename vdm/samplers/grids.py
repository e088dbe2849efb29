"""Grids of noise levels a sampler visits: timestep subsequences of a discrete schedule
(Nichol & Dhariwal 2021 §4; DDIM's uniform and quadratic; Lin et al. 2024's trailing), the
Karras et al. 2022 rho-grid (eq. 5), and uniform times of a continuous schedule."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm.schedules import DiscreteSchedule, invert_log_snr

DISCRETE_SPACINGS = ("linspace", "leading", "trailing", "quadratic", "karras")
CONTINUOUS_SPACINGS = ("linspace", "karras")
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX = 0.002, 80.0  # Karras et al. 2022, Table 1


def check_int(name, value, lo):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def timestep_spacing(T: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """An increasing subsequence of num_steps distinct timesteps of 1..T (int32).

      linspace   round(linspace(T, 1, num_steps)): both ends included (Nichol & Dhariwal 2021 §4)
      leading    1 + k floor(T / num_steps), k = 0..num_steps-1 (DDIM's "uniform", starts at t = 1)
      trailing   round(T - k T / num_steps): ends at T (Lin et al. 2024)
      quadratic  1 + floor(k^2 0.8 T / (num_steps - 1)^2) (DDIM code, "quad"; dense at low noise)
    """
    check_int("T", T, 1)
    check_int("num_steps", num_steps, 1)
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
    check_int("num_steps", num_steps, 1)
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
    check_int("num_steps", num_steps, 1)
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
