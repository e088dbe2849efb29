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


@jax.jit
def _tweedie(mix, x, lam):
    grad = jax.vmap(jax.grad(marginal_log_prob, argnums=1), (None, 0, None))(mix, x, lam)
    hess = jax.vmap(jax.hessian(marginal_log_prob, argnums=1), (None, 0, None))(mix, x, lam)
    return grad, jnp.diagonal(hess, axis1=1, axis2=2), exact.score(mix, x, lam), exact.posterior(mix, x, lam)


@pytest.mark.parametrize("mix", [MIX1, MIX2], ids=["1d", "2d"])
@pytest.mark.parametrize("log_snr", [-6.0, 0.0, 3.0, 9.0])
def test_tweedie_identities(mix, log_snr):
    """score = grad log q (autodiff of an independent density); E[x0|x_t] = (x_t + sigma^2 score) / alpha;
    Var[x0|x_t] = sigma^2/alpha^2 (1 + sigma^2 d^2 log q / dx^2) (second-order Tweedie, diagonal);
    x_t = alpha E[x0|x_t] + sigma E[eps|x_t]."""
    x = 6.0 * jax.random.normal(jax.random.PRNGKey(0), (16, mix.means.shape[1]))
    lam = jnp.float32(log_snr)
    alpha, sigma = (float(a) for a in diffusion.alpha_sigma(lam))
    grad, hess_diag, score, (x0, x0_var, eps) = _tweedie(mix, x, lam)
    np.testing.assert_allclose(score, grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x0, (x + sigma ** 2 * grad) / alpha, rtol=1e-3, atol=1e-3 / alpha)
    ratio = (sigma / alpha) ** 2
    np.testing.assert_allclose(x0_var, ratio * (1 + sigma ** 2 * hess_diag), rtol=2e-3, atol=1e-3 * ratio)
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)


@jax.jit
def _forward_pairs(key):
    k0, k1 = jax.random.split(key)
    x0 = exact.sample(k0, MIX1, 200_000)
    return x0, diffusion.sample_q_xt_given_x0(k1, x0, 0.0)[0]


def test_posterior_mean_by_monte_carlo():
    """E[x0 | x_t] equals the average of x_0 over forward samples whose x_t falls in a narrow bin."""
    x0, x_t = (np.asarray(a[:, 0]) for a in _forward_pairs(jax.random.PRNGKey(1)))
    centres = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    pred = np.asarray(exact.posterior(MIX1, jnp.asarray(centres[:, None]), 0.0)[0][:, 0])
    for centre, p in zip(centres, pred):
        mc = x0[np.abs(x_t - centre) < 0.03]
        assert abs(mc.mean() - p) < 4 * mc.std() / np.sqrt(mc.size) + 0.02


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_every_parameterization_is_the_same_denoiser(parameterization):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (32, 2))
    t = jnp.arange(1, 1000, 31)[:32].astype(jnp.int32)
    lam = SCHEDULE.log_snr[t][:, None]
    out = jax.jit(exact.model_fn(MIX2, parameterization, schedule=SCHEDULE))(x, t)
    x0, eps = diffusion.x0_eps_from_output(out, x, lam, parameterization)
    x0_ref, _, eps_ref = exact.posterior(MIX2, x, SCHEDULE.log_snr[t])
    np.testing.assert_allclose(eps, eps_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x0 * jnp.sqrt(jax.nn.sigmoid(lam)), x0_ref * jnp.sqrt(jax.nn.sigmoid(lam)),
                               rtol=1e-4, atol=1e-4)


def test_continuous_time_model_reads_log_snr_fn():
    log_snr_fn = schedules.continuous_schedule("cosine")
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 1))
    t = jnp.linspace(0.05, 0.95, 8)
    out = jax.jit(exact.model_fn(MIX1, "v", log_snr_fn=log_snr_fn))(x, t)
    ref = jax.jit(lambda x, t: diffusion.output_from_x0_eps(
        *exact.posterior(MIX1, x, log_snr_fn(t))[::2], x, log_snr_fn(t)[:, None], "v"))(x, t)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


@jax.jit
def _mc_reverse_variance(mix, key, x, lam_s, lam_t):
    """Var[x_{t-1} | x_t] by Monte Carlo, written independently of vdm.exact: the component from
    the posterior responsibilities, x_0 from that component's Gaussian posterior, then
    x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
    n = 100_000
    alpha, sigma = diffusion.alpha_sigma(lam_t)
    mu, v0 = mix.means[:, 0], mix.variances[:, 0]

    def one(key, x, lam_s, lam_t, a, s):
        v = a ** 2 * v0 + s ** 2
        log_r = jnp.log(mix.weights) - 0.5 * (x - a * mu) ** 2 / v - 0.5 * jnp.log(v)
        k0, k1, k2 = jax.random.split(key, 3)
        comp = jax.random.categorical(k0, log_r, shape=(n,))
        x0 = (mu + a * v0 * (x - a * mu) / v)[comp] + jnp.sqrt(v0 * s ** 2 / v)[comp] * jax.random.normal(k1, (n,))
        mean, var, _ = diffusion.q_posterior(x0[:, None], jnp.full((n, 1), x), log_snr_s=lam_s, log_snr_t=lam_t)
        return jnp.var(mean + jnp.sqrt(var) * jax.random.normal(k2, (n, 1)))

    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(one)(keys, x[:, 0], lam_s, lam_t, alpha, sigma)


def test_learned_variance_is_the_moment_matched_reverse_variance():
    """``learned`` outputs log Var[x_{t-1} | x_t] (checked by Monte Carlo); learned_range's fraction
    maps back, through p_mean_variance, to the same log-variance clipped to [log beta~, log beta]."""
    mix = exact.gaussian_mixture([0.5, 0.5], [-1.0, 1.0], 0.05)  # narrow modes: optimum inside [beta~, beta]
    t = jnp.array([40, 40, 300, 300], jnp.int32)
    x = jnp.array([[0.0], [0.95], [-0.6], [0.1]])
    lam_t, lam_s = SCHEDULE.log_snr[t], SCHEDULE.log_snr[t - 1]
    out = jax.jit(exact.model_fn(mix, "eps", schedule=SCHEDULE, variance_type="learned"))(x, t)
    mc = _mc_reverse_variance(mix, jax.random.PRNGKey(4), x, lam_s, lam_t)
    np.testing.assert_allclose(np.exp(out[:, 1]), mc, rtol=0.02)
    model_r = exact.model_fn(mix, "eps", schedule=SCHEDULE, variance_type="learned_range")
    log_var_r = jax.jit(lambda x: diffusion.p_mean_variance(model_r(x, t), x, "eps", "learned_range",
                                                            log_snr_s=lam_s, log_snr_t=lam_t)[1])(x)
    log_small, log_large = diffusion.reverse_log_variance_bounds(log_snr_s=lam_s, log_snr_t=lam_t,
                                                                 log_snr_next=SCHEDULE.log_snr[t + 1])
    np.testing.assert_allclose(log_var_r[:, 0], np.clip(out[:, 1], log_small, log_large), rtol=1e-4, atol=1e-4)
    assert np.any(out[:, 1] > log_large) and np.any(out[:, 1] < log_large)  # both cases are exercised


def test_learned_range_at_t1_is_finite():
    out = jax.jit(exact.model_fn(MIX1, "eps", schedule=SCHEDULE, variance_type="learned_range"))(
        jnp.zeros((2, 1)), jnp.array([1, 2], jnp.int32))
    assert np.all(np.isfinite(out))


def test_conditional_model_labels_and_null_label():
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(5), (6, 2))
    t = jnp.full((6,), 200, jnp.int32)
    cond = exact.conditional_model_fn(MIX2, "x0", schedule=SCHEDULE)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    singles = [exact.gaussian_mixture([1.0], MIX2.means[k:k + 1], MIX2.variances[k:k + 1]) for k in (0, 1)]

    @jax.jit
    def outputs(x):
        return (cond(x, t, labels), exact.model_fn(MIX2, "x0", schedule=SCHEDULE)(x, t),
                [exact.model_fn(m, "x0", schedule=SCHEDULE)(x, t) for m in singles])

    out, full, single = outputs(x)
    for k in (0, 1):
        np.testing.assert_allclose(out[labels == k], single[k][labels == k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[labels == 2], full[labels == 2], rtol=1e-5, atol=1e-5)


def test_samples_and_component_stats():
    x = jax.jit(lambda key: exact.sample(key, MIX2, 100_000))(jax.random.PRNGKey(6))
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
