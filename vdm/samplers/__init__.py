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

Layout: ``grids`` (levels to visit), ``denoiser`` (the model read through its
parameterization), ``steps`` (one-step updates), ``drive`` (the scan driver),
``loops`` (the samplers, each registered beside its definition), ``registry``,
``guidance`` (classifier-free guidance) and ``front`` (``sample``). Adding a
sampler is a driver in ``loops`` with its ``@register(...)`` line.
"""
from vdm.samplers.denoiser import Denoiser, dynamic_threshold
from vdm.samplers.drive import Trajectory
from vdm.samplers.front import check_zero_snr_start, pmap_sample, sample
from vdm.samplers.grids import (CONTINUOUS_SPACINGS, DISCRETE_SPACINGS, KARRAS_SIGMA_MAX, KARRAS_SIGMA_MIN, Grid,
                                karras_sigmas, time_grid, timestep_spacing)
from vdm.samplers.guidance import classifier_free_guidance
from vdm.samplers.loops import (DPM_SOLVER_ORDERS, ODE_METHODS, ancestral, annealed_langevin, ddim, dpm_solver,
                                dpm_solver_orders, edm_sampler, encode, flow_sampler, nearest_level_fn,
                                predictor_corrector, probability_flow)
from vdm.samplers.registry import REGISTRY, check_options, num_evaluations, register
from vdm.samplers.steps import (ancestral_step, corrector_step, ddim_step, dpm_solver_step, edm_step, flow_step,
                                langevin_step, ode_step)

SAMPLERS = tuple(REGISTRY)
SCORE_SAMPLERS = tuple(name for name, info in REGISTRY.items() if info.needs_score)
# Samplers written in the VE variable y = x_t / alpha_t, which is infinite at SNR 0.
FINITE_START_SAMPLERS = tuple(name for name, info in REGISTRY.items() if info.finite_start)
