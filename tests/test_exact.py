"""The exact Gaussian-mixture denoiser: Tweedie identities, parameterizations, variances, labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from vdm import diffusion, exact, schedules

MIX1 = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)
MIX2 = exact.gaussian_mixture([0.3, 0.7], [[-3.0, -1.0], [2.0, 2.0]], [[0.5, 1.0], [1.0, 0.25]])
SCHEDULE = schedules.discrete_schedule("linear", 1000)


def marginal_log_prob(mix, x, log_snr):
    """log q(x_t) written independently of vdm.exact: a mixture of N(alpha mu_k, alpha^2 v_k + sigma^2)."""
    a2, s2 = jax.nn.sigmoid(log_snr), jax.nn.sigmoid(-log_snr)
    var = a2 * mix.variances + s2
    log_n = -0.5 * jnp.sum((x - jnp.sqrt(a2) * mix.means) ** 2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
    return logsumexp(jnp.log(mix.weights) + log_n)


@pytest.mark.parametrize("mix", [MIX1, MIX2], ids=["1d", "2d"])
@pytest.mark.parametrize("log_snr", [-6.0, 0.0, 3.0, 9.0])
def test_tweedie_identities(mix, log_snr):
    """score = grad log q (autodiff of an independent density); E[x0|x_t] = (x_t + sigma^2 score) / alpha;
    Var[x0|x_t] = sigma^2/alpha^2 (1 + sigma^2 d^2 log q / dx^2) (second-order Tweedie, diagonal);
    x_t = alpha E[x0|x_t] + sigma E[eps|x_t]."""
    D = mix.means.shape[1]
    x = 6.0 * jax.random.normal(jax.random.PRNGKey(0), (16, D))
    lam = jnp.float32(log_snr)
    alpha, sigma = diffusion.alpha_sigma(lam)
    grad = jax.vmap(jax.grad(marginal_log_prob, argnums=1), (None, 0, None))(mix, x, lam)
    hess = jax.vmap(jax.hessian(marginal_log_prob, argnums=1), (None, 0, None))(mix, x, lam)
    x0, x0_var, eps = exact.posterior(mix, x, lam)
    np.testing.assert_allclose(exact.score(mix, x, lam), grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x0, (x + sigma ** 2 * grad) / alpha, rtol=1e-3, atol=1e-3 / alpha)
    diag = jnp.diagonal(hess, axis1=1, axis2=2)
    np.testing.assert_allclose(x0_var, sigma ** 2 / alpha ** 2 * (1 + sigma ** 2 * diag),
                               rtol=1e-3, atol=1e-3 * (sigma / alpha) ** 2)
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)


def test_posterior_mean_by_monte_carlo():
    """E[x0 | x_t] equals the average of x_0 over forward samples whose x_t falls in a narrow bin."""
    k0, k1 = jax.random.split(jax.random.PRNGKey(1))
    x0 = exact.sample(k0, MIX1, 400_000)
    lam = jnp.float32(0.0)
    x_t, _ = diffusion.sample_q_xt_given_x0(k1, x0, lam)
    for centre in (-1.0, 0.0, 0.5, 2.0):
        sel = np.abs(np.asarray(x_t[:, 0]) - centre) < 0.02
        mc = np.asarray(x0[:, 0])[sel]
        pred = exact.posterior(MIX1, jnp.array([[centre]]), lam)[0][0, 0]
        assert abs(mc.mean() - pred) < 4 * mc.std() / np.sqrt(sel.sum()) + 0.02


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_every_parameterization_is_the_same_denoiser(parameterization):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (32, 2))
    t = jnp.arange(1, 1000, 31)[:32].astype(jnp.int32)
    lam = SCHEDULE.log_snr[t][:, None]
    out = exact.model_fn(MIX2, parameterization, schedule=SCHEDULE)(x, t)
    x0, eps = diffusion.x0_eps_from_output(out, x, lam, parameterization)
    x0_ref, _, eps_ref = exact.posterior(MIX2, x, SCHEDULE.log_snr[t])
    np.testing.assert_allclose(eps, eps_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x0 * jnp.sqrt(jax.nn.sigmoid(lam)), x0_ref * jnp.sqrt(jax.nn.sigmoid(lam)),
                               rtol=1e-4, atol=1e-4)


def test_continuous_time_model_reads_log_snr_fn():
    log_snr_fn = schedules.continuous_schedule("cosine")
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 1))
    t = jnp.linspace(0.05, 0.95, 8)
    out = exact.model_fn(MIX1, "v", log_snr_fn=log_snr_fn)(x, t)
    x0, _, eps = exact.posterior(MIX1, x, log_snr_fn(t))
    np.testing.assert_allclose(out, diffusion.output_from_x0_eps(x0, eps, x, log_snr_fn(t)[:, None], "v"),
                               rtol=1e-6)


def test_learned_variance_is_the_moment_matched_reverse_variance():
    """Var[x_{t-1} | x_t] by Monte Carlo: x_0 from the exact posterior mixture, then q(x_{t-1}|x_t,x_0).
    learned_range's fraction maps back (through p_mean_variance) to the same log-variance."""
    t = jnp.array([40, 40, 300, 300], jnp.int32)
    x = jnp.array([[0.5], [2.5], [-1.0], [0.3]])
    lam_t, lam_s = SCHEDULE.log_snr[t], SCHEDULE.log_snr[t - 1]
    out = exact.model_fn(MIX1, "eps", schedule=SCHEDULE, variance_type="learned")(x, t)
    log_var = out[:, 1]
    # Independent route: sample the posterior mixture over components, then x_0, then x_{t-1}.
    n = 200_000
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    alpha, sigma = diffusion.alpha_sigma(lam_t)
    for b in range(4):
        a, s = alpha[b], sigma[b]
        v = a ** 2 * MIX1.variances[:, 0] + s ** 2
        r = jax.nn.softmax(jnp.log(MIX1.weights) - 0.5 * (x[b, 0] - a * MIX1.means[:, 0]) ** 2 / v
                           - 0.5 * jnp.log(v))
        comp = jax.random.categorical(keys[0], jnp.log(r), shape=(n,))
        mean_k = MIX1.means[:, 0] + a * MIX1.variances[:, 0] * (x[b, 0] - a * MIX1.means[:, 0]) / v
        var_k = MIX1.variances[:, 0] * s ** 2 / v
        x0 = mean_k[comp] + jnp.sqrt(var_k[comp]) * jax.random.normal(keys[1], (n,))
        xt = jnp.full((n, 1), x[b, 0])
        mean, var, _ = diffusion.q_posterior(x0[:, None], xt, lam_s[b], lam_t[b])
        x_prev = mean + jnp.sqrt(var) * jax.random.normal(keys[2], (n, 1))
        mc = float(jnp.var(x_prev))
        assert abs(np.exp(float(log_var[b])) / mc - 1) < 0.02
    out_r = exact.model_fn(MIX1, "eps", schedule=SCHEDULE, variance_type="learned_range")(x, t)
    _, log_var_r, _ = diffusion.p_mean_variance(out_r, x, lam_s, lam_t, "eps", "learned_range")
    np.testing.assert_allclose(log_var_r[:, 0], log_var, rtol=1e-4, atol=1e-4)


def test_learned_range_at_t1_is_finite():
    out = exact.model_fn(MIX1, "eps", schedule=SCHEDULE, variance_type="learned_range")(
        jnp.zeros((2, 1)), jnp.array([1, 2], jnp.int32))
    assert np.all(np.isfinite(out))


def test_conditional_model_labels_and_null_label():
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(5), (6, 2))
    t = jnp.full((6,), 200, jnp.int32)
    cond = exact.conditional_model_fn(MIX2, "x0", schedule=SCHEDULE)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    out = cond(x, t, labels)
    full = exact.model_fn(MIX2, "x0", schedule=SCHEDULE)(x, t)
    for k in (0, 1):
        single = exact.gaussian_mixture([1.0], MIX2.means[k:k + 1], MIX2.variances[k:k + 1])
        ref = exact.model_fn(single, "x0", schedule=SCHEDULE)(x, t)
        np.testing.assert_allclose(out[labels == k], ref[labels == k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[labels == 2], full[labels == 2], rtol=1e-5, atol=1e-5)


def test_samples_and_component_stats():
    x = exact.sample(jax.random.PRNGKey(6), MIX2, 100_000)
    w, m, v = exact.component_stats(MIX2, x)
    np.testing.assert_allclose(w, MIX2.weights, atol=0.01)
    np.testing.assert_allclose(m, MIX2.means, atol=0.02)
    np.testing.assert_allclose(v, MIX2.variances, rtol=0.03)


@pytest.mark.parametrize("args, match", [
    (([0.5, 0.6], [0.0, 1.0], 1.0), "weights"),
    (([0.5, 0.5], [[0.0], [1.0], [2.0]], 1.0), "means"),
    (([0.5, 0.5], [0.0, 1.0], [1.0, 1.0, 1.0]), "variances"),
    (([0.5, 0.5], [0.0, 1.0], -1.0), "variances"),
])
def test_bad_mixture_raises(args, match):
    with pytest.raises(ValueError, match=match):
        exact.gaussian_mixture(*args)


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="exactly one"):
        exact.model_fn(MIX1, "eps")
    with pytest.raises(ValueError, match="parameterization"):
        exact.model_fn(MIX1, "mean", schedule=SCHEDULE)
    with pytest.raises(ValueError, match="discrete schedule"):
        exact.model_fn(MIX1, "eps", log_snr_fn=schedules.continuous_schedule("cosine"), variance_type="learned")
