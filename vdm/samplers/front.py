"""The front door: ``sample`` validates everything on the host, then runs one compiled
driver (jit, or pmap over the local devices) of a registered sampler."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion, parallel
from vdm.samplers.denoiser import Denoiser
from vdm.samplers.drive import Trajectory, check_every
from vdm.samplers.grids import Grid, time_grid
from vdm.samplers.guidance import classifier_free_guidance
from vdm.samplers.loops import nearest_level_fn
from vdm.samplers.registry import REGISTRY, check_options, lookup
from vdm.schedules import DiscreteSchedule


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a sampling run (hashable: the jit/pmap cache key)."""

    sampler: str
    shape: tuple
    den: tuple  # (parameterization, variance_type, clip_x0, threshold, sigma_data)
    options: tuple
    levels: tuple  # ("discrete", log-SNR table) or ("continuous", log_snr_fn), for ``nearest_level_fn``
    conditional: bool
    guidance_scale: float | None
    null_label: int | None
    trajectory_every: int | None
    rows: jax.sharding.Sharding | None = None  # the batch axis's sharding (``sample(..., sharding=...)``)


def _prepare(shape, sampler, schedule, log_snr_fn, num_steps, spacing, rho, sigma_min, sigma_max,
             parameterization, variance_type, clip_x0, threshold, labels, guidance_scale, null_label,
             trajectory_every, options, sigma_data=diffusion.EDM_SIGMA_DATA):
    """All checks, before anything is traced; returns (_Spec, Grid)."""
    info = lookup(sampler)
    if (schedule is None) == (log_snr_fn is None):
        raise ValueError("give exactly one of schedule (a DiscreteSchedule) or log_snr_fn (continuous time)")
    if info.needs_score and parameterization not in diffusion.PARAMETERIZATIONS:
        raise ValueError(f"sampler {sampler!r} needs the score grad log q(x_t) = -eps_hat / sigma_t, which a "
                         f"model gives through a parameterization in {diffusion.PARAMETERIZATIONS}; "
                         f"got {parameterization!r}")
    den = Denoiser(None, parameterization, variance_type, clip_x0, threshold, float(sigma_data))
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *example_shape) with positive sizes, got {shape}")
    opts = check_options(sampler, options)
    check_every(trajectory_every)
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
    if guidance_scale is not None and not (guidance_scale >= 0 and np.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (0: the conditional model), "
                         f"got {guidance_scale!r}")
    if guidance_scale is not None and (labels is None or null_label is None):
        raise ValueError("guidance_scale needs labels and null_label (classifier-free guidance)")
    if labels is not None and np.shape(labels) != shape[:1]:
        raise ValueError(f"labels must have shape {shape[:1]} (one per example), got {np.shape(labels)}")
    levels = (("discrete", tuple(np.asarray(schedule.log_snr, np.float32).tolist())) if schedule is not None
              else ("continuous", log_snr_fn))
    spec = _Spec(sampler, shape[1:], (den.parameterization, den.variance_type, den.clip_x0, den.threshold,
                                      den.sigma_data),
                 tuple(sorted(opts.items())), levels if "time_of" in info.context else None, labels is not None,
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
    if REGISTRY[sampler].finite_start:
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
    if spec.rows is not None:  # keep the batch split over the devices, through the loop to the output
        x_T = jax.lax.with_sharding_constraint(x_T, spec.rows)
    info = REGISTRY[spec.sampler]
    context = {"axis_name": lambda: axis_name, "time_of": lambda: nearest_level_fn(spec.levels)}
    options = dict(spec.options, **{name: context[name]() for name in info.context})
    return info.fn(den, x_T, k_steps, grid, trajectory_every=spec.trajectory_every, **options)


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
           sharding=None, params=None, sigma_data: float = diffusion.EDM_SIGMA_DATA, **options):
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
    device count (up to float rounding). With ``sharding`` (a ``jax.sharding.Sharding`` of a
    [batch] array, e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``), the per-example keys and
    labels are placed with it, so the one compiled sampler runs over its devices, each drawing
    its slice of the batch, with ``params`` as they are sharded (every process of a
    multi-process mesh calls it); the result is a global array equal to the single-device one.
    The compile is cached on (model_fn, settings, shapes): reuse the same model_fn object. With ``params``, the model is
    model_fn(params, x_t, t) and params a traced argument, so one compile serves every
    parameter value (a training run's successive EMA parameters). Returns the samples, or
    (samples, Trajectory) with ``trajectory_every``.
    """
    spec, grid = _prepare(shape, sampler, schedule, log_snr_fn, num_steps, spacing, rho, sigma_min,
                          sigma_max, parameterization, variance_type, clip_x0, threshold, labels,
                          guidance_scale, null_label, trajectory_every, options, sigma_data)
    keys = jax.random.split(key, shape[0])
    labels = None if labels is None else jnp.asarray(labels)
    if sharding is not None:
        if pmap:
            raise ValueError("give pmap=True or a sharding, not both")
        keys, labels = (None if a is None else _place_rows(a, sharding) for a in (keys, labels))
        spec = dataclasses.replace(spec, rows=sharding)
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


def _place_rows(rows, sharding):
    """The same host value in every process -> a global array with ``sharding``
    (``vdm.parallel.place``), or a ValueError when the batch does not split evenly."""
    rows = np.asarray(rows)
    try:
        sharding.shard_shape(rows.shape)
    except ValueError as e:
        raise ValueError(f"the batch of {rows.shape[0]} samples cannot be split by the sharding {sharding}: "
                         f"{e}") from None
    return parallel.place(rows, sharding)


def pmap_sample(model_fn: Callable, key, shape, **kwargs):
    """``sample(..., pmap=True)``: the batch spread over all local devices with ``jax.pmap``."""
    return sample(model_fn, key, shape, pmap=True, **kwargs)
