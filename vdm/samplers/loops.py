"""The samplers: (den, x_T, keys, grid) -> (x_0, Trajectory or None), traceable (jit, pmap).
x_T is the VP prior sample N(0, I); keys holds one key per example. Each is registered
(``vdm.samplers.registry.register``) with its options, their check and its network-call count.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vdm import diffusion
from vdm.samplers.denoiser import Denoiser
from vdm.samplers.drive import check_every, drive, example_normal, grid_plan
from vdm.samplers.grids import Grid, check_int
from vdm.samplers.registry import is_number, register
from vdm.samplers.steps import (ancestral_step, corrector_step, ddim_step, dpm_solver_step, edm_step,
                                flow_step, langevin_step, ode_step)
from vdm.schedules import invert_log_snr

DPM_SOLVER_ORDERS = (1, 2, 3)
ODE_METHODS = ("euler", "heun")


@register("ancestral")
def ancestral(den: Denoiser, x_T, keys, grid: Grid, *, trajectory_every=None):
    """Ancestral sampling x_T -> ... -> x_0 with ``ancestral_step`` on every grid step:
    Ho et al. 2020 Alg. 2 on the full grid; respaced (Nichol & Dhariwal §4) on a subsequence;
    the VDM sampler (Kingma et al. 2021) on a continuous grid, any number of steps. ``learned`` (a free
    log-variance) is the variance of one step t -> t-1 and needs the full discrete grid."""
    check_every(trajectory_every)

    def step(x, p):
        return ancestral_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"],
                              noise=example_normal(keys, x, p["i"]))

    return drive(step, x_T, grid_plan(grid), grid, trajectory_every)


def _check_ddim(opts):
    eta = opts["eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")


@register("ddim", defaults={"eta": 0.0}, check=_check_ddim)
def ddim(den: Denoiser, x_T, keys, grid: Grid, *, eta: float = 0.0, trajectory_every=None):
    """DDIM (Song et al. 2021) on the grid with ``ddim_step``; keys may be None when eta = 0."""
    _check_ddim(dict(eta=eta))
    check_every(trajectory_every)

    def step(x, p):
        noise = 0.0 if eta == 0 else example_normal(keys, x, p["i"])
        return ddim_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"], noise=noise, eta=eta)

    return drive(step, x_T, grid_plan(grid), grid, trajectory_every)


def _check_langevin(opts):
    check_int("steps_per_level", opts["steps_per_level"], 1)
    if not opts["step_size"] > 0:
        raise ValueError(f"step_size must be > 0, got {opts['step_size']!r}")
    if not isinstance(opts["denoise"], bool):
        raise ValueError(f"denoise must be True or False, got {opts['denoise']!r}")


@register("langevin", defaults={"steps_per_level": 100, "step_size": 2e-5, "denoise": True},
          check=_check_langevin, evaluations=lambda n, opts: n * (opts["steps_per_level"] + 1),
          needs_score=True, finite_start=True)
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
    _check_langevin(dict(steps_per_level=steps_per_level, step_size=step_size, denoise=denoise))
    check_every(trajectory_every)
    plan = grid_plan(grid)
    plan["a"] = step_size * jnp.exp(plan["lam_t"][-1] - plan["lam_t"])

    def step(x, p):
        def inner(x, j):
            noise = example_normal(keys, x, p["i"], j)
            return langevin_step(den, x, p["t"], p["lam_t"], p["a"], noise)[0], None

        x, _ = lax.scan(inner, x, jnp.arange(steps_per_level))
        alpha_t, _ = diffusion.alpha_sigma(p["lam_t"])
        alpha_s, _ = diffusion.alpha_sigma(p["lam_s"])
        x0, _, _ = den(x, p["t"], p["lam_t"])
        last = jnp.isinf(p["lam_s"]) & denoise
        return jnp.where(last, x0, alpha_s * x / alpha_t), x0

    return drive(step, x_T, plan, grid, trajectory_every)


def _check_pc(opts):
    check_int("corrector_steps", opts["corrector_steps"], 1)
    if not opts["snr"] > 0:
        raise ValueError(f"snr must be > 0, got {opts['snr']!r}")


@register("pc", defaults={"corrector_steps": 1, "snr": 0.16}, check=_check_pc,
          evaluations=lambda n, opts: n * (opts["corrector_steps"] + 1), needs_score=True,
          finite_start=True, context=("axis_name",))
def predictor_corrector(den: Denoiser, x_T, keys, grid: Grid, *, corrector_steps: int = 1,
                        snr: float = 0.16, trajectory_every=None, axis_name=None):
    """Predictor-corrector sampling (Song et al. 2021, SDE paper, Alg. 2): at each level t,
    ``corrector_steps`` Langevin corrector steps (``corrector_step``, Alg. 5) then the reverse
    (ancestral) predictor step t -> s (``ancestral_step``; Song et al.'s ancestral predictor is its
    fixed_large case). Corrector-then-predictor is the order of the paper's code, so the data level
    is never corrected. ``axis_name``: the pmap axis the corrector's norms are averaged over."""
    _check_pc(dict(corrector_steps=corrector_steps, snr=snr))
    check_every(trajectory_every)

    def step(x, p):
        alpha_step = jnp.exp(jax.nn.log_sigmoid(p["lam_t"]) - jax.nn.log_sigmoid(p["lam_s"]))

        def inner(x, j):
            noise = example_normal(keys, x, p["i"], j + 1)
            return corrector_step(den, x, p["t"], p["lam_t"], alpha_step, snr, noise, axis_name)[0], None

        x, _ = lax.scan(inner, x, jnp.arange(corrector_steps))
        # The predictor's noise is stream 0 of fold_in(key, i); corrector step j uses stream j + 1.
        return ancestral_step(den, x, t=p["t"], log_snr_t=p["lam_t"], log_snr_s=p["lam_s"],
                              noise=example_normal(keys, x, p["i"], 0))

    return drive(step, x_T, grid_plan(grid), grid, trajectory_every)


def _check_method(opts):
    if opts["method"] not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}, got {opts['method']!r}")


def _ode_evaluations(n, opts):
    """Heun: two calls per step but one into the data level (Karras et al. Alg. 1)."""
    return 2 * n - 1 if opts["method"] == "heun" else n


@register("ode", defaults={"method": "heun"}, check=_check_method, evaluations=_ode_evaluations,
          needs_score=True, finite_start=True)
def probability_flow(den: Denoiser, x_T, keys, grid: Grid, *, method: str = "heun",
                     trajectory_every=None):
    """Deterministic sampling with the probability-flow ODE (``ode_step``, Karras et al. 2022
    Alg. 1) from x_T ~ N(0, I) along the grid (Karras rho-grid with spacing="karras"). Euler costs
    one model call per step, Heun two (one on the last step). ``keys`` is unused."""
    _check_method(dict(method=method))
    check_every(trajectory_every)

    def step(x, p):
        return ode_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"], method=method)

    return drive(step, x_T, grid_plan(grid), grid, trajectory_every)


def encode(den: Denoiser, x0, grid: Grid, *, method: str = "euler"):
    """Deterministic encoding x_0 -> x_T by the probability-flow ODE run upwards through the
    grid's levels (method "euler" is DDIM inversion, Song et al. 2021 §4.3 / §5.4). Its first step,
    from the data level to the least noisy level t_1, inverts the last decoding step
    x_0 = (x_1 - sigma_1 eps_hat(x_1)) / alpha_1 with eps_hat evaluated at alpha_1 x_0:
    x_1 = alpha_1 x_0 + sigma_1 eps_hat(alpha_1 x_0). Decoding with ``ddim`` (eta = 0) or
    ``probability_flow`` on the same grid returns x_0 up to discretization error."""
    _check_method(dict(method=method))
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


def _check_dpm_solver(opts):
    order = opts["order"]
    if isinstance(order, bool) or order not in DPM_SOLVER_ORDERS:
        raise ValueError(f"order (of DPM-Solver++) must be one of {DPM_SOLVER_ORDERS} "
                         f"(1 = DDIM, 2 = 2M, 3 = 3M), got {order!r}")


@register("dpm_solver", defaults={"order": 2}, check=_check_dpm_solver)
def dpm_solver(den: Denoiser, x_T, keys, grid: Grid, *, order: int = 2, trajectory_every=None):
    """Multistep DPM-Solver++ (Lu et al. 2022) of the given ``order`` along the grid with
    ``dpm_solver_step``: one model call per step, the last two x0_hat carried in the scan.
    order 1 is DDIM (eta = 0). ``keys`` is unused."""
    _check_dpm_solver(dict(order=order))
    check_every(trajectory_every)
    plan = grid_plan(grid)
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
    return drive(step, x_T, plan, grid, trajectory_every, state=(zeros, zeros))


def _check_edm(opts):
    for name in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
        if not is_number(opts[name]):
            raise ValueError(f"{name} must be a number, got {opts[name]!r}")
    if not opts["S_churn"] >= 0:
        raise ValueError(f"S_churn must be >= 0 (Karras et al. 2022, Alg. 2), got {opts['S_churn']!r}")
    if not 0 <= opts["S_tmin"] <= opts["S_tmax"]:
        raise ValueError(f"need 0 <= S_tmin <= S_tmax, got S_tmin={opts['S_tmin']!r}, "
                         f"S_tmax={opts['S_tmax']!r}")
    if not opts["S_noise"] > 0:
        raise ValueError(f"S_noise must be > 0, got {opts['S_noise']!r}")


@register("edm", defaults={"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.0},
          check=_check_edm, evaluations=lambda n, opts: 2 * n - 1, finite_start=True, context=("time_of",))
def edm_sampler(den: Denoiser, x_T, keys, grid: Grid, *, time_of: Callable, S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0,
                trajectory_every=None):
    """The stochastic sampler of Karras et al. 2022, Alg. 2 (NVlabs/edm generate.py), with
    ``edm_step`` on the grid (the rho = 7 grid with spacing="karras"): at each level with
    S_tmin <= sigma_t <= S_tmax, gamma = min(S_churn / N, sqrt(2) - 1) for N steps, else 0.
    S_churn = 0 is the deterministic Heun sampler (``probability_flow``, Alg. 1). 2N - 1 model
    calls. ``time_of`` maps a log-SNR to the nearest model level (``nearest_level_fn``)."""
    opts = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    _check_edm(opts)
    check_every(trajectory_every)
    plan = grid_plan(grid)
    gamma_max = min(S_churn / plan["i"].shape[0], np.sqrt(2.0) - 1.0)

    def step(x, p):
        sigma_t = jnp.exp(-0.5 * p["lam_t"])
        gamma = jnp.where((sigma_t >= S_tmin) & (sigma_t <= S_tmax), gamma_max, 0.0)
        return edm_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"],
                        noise=example_normal(keys, x, p["i"]), gamma=gamma, S_noise=S_noise, time_of=time_of)

    return drive(step, x_T, plan, grid, trajectory_every)


@register("flow", defaults={"method": "euler"}, check=_check_method, evaluations=_ode_evaluations)
def flow_sampler(den: Denoiser, x_T, keys, grid: Grid, *, method: str = "euler", trajectory_every=None):
    """Deterministic sampling of the rectified-flow ODE with ``flow_step`` (Euler: one model call
    per step, the flow-matching sampler of Lipman et al. / Esser et al. on the uniform t-grid of the
    "flow" schedule; Heun: two, one on the last step). ``keys`` is unused."""
    _check_method(dict(method=method))
    check_every(trajectory_every)

    def step(x, p):
        return flow_step(den, x, t=p["t"], log_snr_t=p["lam_t"], s=p["s"], log_snr_s=p["lam_s"], method=method)

    return drive(step, x_T, grid_plan(grid), grid, trajectory_every)



def nearest_level_fn(levels) -> Callable:
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
