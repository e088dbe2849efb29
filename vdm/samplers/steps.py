"""One-step updates (pure). Levels (t, log-SNR) are scalars: a driver steps the whole batch
through one level. ``noise`` is a standard normal array like x. Every step that goes from
level t to level s takes both levels by keyword (t=, log_snr_t=, s=, log_snr_s=)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from vdm import diffusion
from vdm.samplers.denoiser import Denoiser


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
