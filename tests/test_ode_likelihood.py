"""Probability-flow ODE likelihood: the exact mixture denoiser recovers the true log-density."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import exact, ode_likelihood as ol, schedules, toy_data

MIX1 = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)  # seed 002's mixture1d


def _log_density(mix, x):
    """log of the mixture density, float64 (written from the definition)."""
    x, w, mu, v = (np.float64(a) for a in (x, mix.weights, mix.means, mix.variances))
    comp = -0.5 * np.sum((x[:, None] - mu) ** 2 / v + np.log(2 * np.pi * v), axis=-1)
    m = comp.max(1, keepdims=True)
    return (m + np.log(np.sum(w * np.exp(comp - m), axis=1, keepdims=True)))[:, 0]


def _errors(mix, model, grid, steps, x):
    want = _log_density(mix, x)
    out = []
    for n in steps:
        times, lam = grid(n)
        r = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam))(x)
        out.append(np.mean(np.abs(np.float64(r["log_prob"]) - want)))
    return np.array(out)


def test_ode_likelihood_of_the_1d_mixture_matches_the_true_density():
    """Held-out points of 1/3 N(-4, 1) + 2/3 N(4, 1): mean |log p_ODE - log p| falls with the step
    count and is < 0.01 nats at 160 Heun steps (continuous vp_linear; discrete linear T = 1000)."""
    x = exact.sample(jax.random.PRNGKey(1), MIX1, 200)
    vp = schedules.continuous_schedule("vp_linear")
    err = _errors(MIX1, exact.model_fn(MIX1, "eps", log_snr_fn=vp), lambda n: ol.continuous_grid(vp, n),
                  (20, 40, 160), x)
    assert np.all(np.diff(err) < 0) and err[-1] < 0.01, err
    times, lam = ol.continuous_grid(vp, 20)  # the model's parameterization does not matter
    by_param = [jax.jit(lambda x: ol.ode_log_likelihood(exact.model_fn(MIX1, p, log_snr_fn=vp), x, times, lam,
                                                        parameterization=p)["log_prob"])(x) for p in ("eps", "v", "x0")]
    np.testing.assert_allclose(by_param[1], by_param[0], atol=1e-3)
    np.testing.assert_allclose(by_param[2], by_param[0], atol=1e-3)
    sch = schedules.discrete_schedule("linear", 1000)
    err = _errors(MIX1, exact.model_fn(MIX1, "eps", schedule=sch), lambda n: ol.discrete_grid(sch.log_snr, n),
                  (20, 160), x)
    assert np.all(np.diff(err) < 0) and err[-1] < 0.01, err


MIX2 = exact.gaussian_mixture([0.5, 0.5], np.array([[-5.0, 0.0], [5.0, 0.0]]) / math.sqrt(26),
                              np.array([[1 / 26, 1.0], [1 / 26, 1.0]]))  # gaussians2d, standardized


def test_ode_likelihood_of_the_2d_mixture_and_hutchinson_agrees_with_the_exact_divergence():
    mix = MIX2
    x = exact.sample(jax.random.PRNGKey(2), mix, 200)
    cos = schedules.continuous_schedule("cosine")
    model = exact.model_fn(mix, "eps", log_snr_fn=cos)
    times, lam = ol.continuous_grid(cos, 160)
    ex = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam))(x)
    assert np.mean(np.abs(np.float64(ex["log_prob"]) - _log_density(mix, x))) < 0.01
    # Hutchinson's estimate is unbiased: its mean over points matches the exact divergence's
    # within the standard error. gaussians2d's Jacobian d eps_hat / dx is diagonal (the coordinates
    # are independent given the component, and only x tells the components apart), so Rademacher
    # probes (z_i^2 = 1) are exact there; a mixture along the diagonal has off-diagonal terms.
    diag = exact.gaussian_mixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], 0.1)
    model_d = exact.model_fn(diag, "eps", log_snr_fn=cos)
    ex_d = jax.jit(lambda x: ol.ode_log_likelihood(model_d, x, times, lam))(x)
    for mix_model, exact_run, probe, noisy in [(model, ex, "gaussian", True), (model, ex, "rademacher", False),
                                               (model_d, ex_d, "rademacher", True)]:
        h = jax.jit(lambda x, k: ol.ode_log_likelihood(mix_model, x, times, lam, k, divergence="hutchinson",
                                                       num_probes=4, probe=probe))(x, jax.random.PRNGKey(3))
        diff = np.float64(h["log_prob"]) - np.float64(exact_run["log_prob"])
        se = math.sqrt(np.mean(np.float64(h["stderr"]) ** 2) / x.shape[0])
        if noisy:
            assert se > 1e-3 and abs(diff.mean()) < 3 * se, (probe, diff.mean(), se)
        else:
            assert np.max(np.abs(diff)) < 1e-3, (probe, diff)
        np.testing.assert_allclose(h["x_T"], exact_run["x_T"], rtol=1e-5, atol=1e-5)  # same trajectory


def test_mixture_fixtures_are_the_toy_data():
    """The mixtures above are toy_data's mixture1d and gaussians2d (their log-densities agree)."""
    for name, mix, dim in [("mixture1d", MIX1, 1), ("gaussians2d", MIX2, 2)]:
        x = np.linspace(-6, 6, 14).reshape(-1, dim)
        np.testing.assert_allclose(toy_data.get(name).log_prob(x), _log_density(mix, x), rtol=1e-6)


def test_dequantized_bits_per_dim_and_bad_arguments():
    x = jnp.linspace(-1, 1, 256)[None]
    u = ol.dequantize(jax.random.PRNGKey(0), x) - x
    assert np.all(np.abs(u) <= 1 / 255 + 1e-7) and np.std(u) > 0.3 / 255
    # A uniform density over the bins of [-1 - 1/255, 1 + 1/255] is exactly 8 bits/dim on the 8-bit scale.
    np.testing.assert_allclose(ol.bits_per_dim_8bit(jnp.float32(-256 * math.log(2 * 256 / 255)), 256), 8.0,
                               rtol=1e-6)
    model = lambda x, t: x
    times, lam = ol.continuous_grid(schedules.continuous_schedule("cosine"), 4)
    with pytest.raises(ValueError, match="divergence must be one of"):
        ol.ode_log_likelihood(model, x, times, lam, divergence="trace")
    with pytest.raises(ValueError, match="num_probes"):
        ol.ode_log_likelihood(model, x, times, lam, jax.random.PRNGKey(0), divergence="hutchinson", num_probes=1)
    with pytest.raises(ValueError, match="not at the data level"):
        ol.ode_log_likelihood(model, x, jnp.arange(3), schedules.discrete_schedule("linear", 2, rescale=False).log_snr)
    with pytest.raises(ValueError, match="T >= 11"):
        ol.discrete_grid(schedules.discrete_schedule("linear", 10, rescale=False).log_snr, 10)


def test_bfloat16_network_is_integrated_in_float32():
    """A network whose output is bfloat16 is read as float32: the state and log p stay float32 and
    within bf16 rounding of the float32 network's result."""
    vp = schedules.continuous_schedule("vp_linear")
    model = exact.model_fn(MIX1, "eps", log_snr_fn=vp)
    x = exact.sample(jax.random.PRNGKey(4), MIX1, 64)
    times, lam = ol.continuous_grid(vp, 40)
    f32 = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam))(x)
    bf16 = jax.jit(lambda x: ol.ode_log_likelihood(lambda y, t: model(y, t).astype(jnp.bfloat16), x, times,
                                                   lam))(x)
    assert bf16["log_prob"].dtype == jnp.float32 and bf16["x_T"].dtype == jnp.float32
    np.testing.assert_allclose(bf16["log_prob"], f32["log_prob"], atol=0.05)
