"""Losses: closed forms, the optimal denoiser of Gaussian data, identities between methods."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vdm import diffusion, losses, schedules

MU, S = 0.5, 0.7  # data x0 ~ N(MU, S^2) independently in every dimension


# ---------------------------------------------------------------------------
# The optimal denoiser for Gaussian data (closed form, written here).
# ---------------------------------------------------------------------------


def posterior_x0(x_t, lam):
    """E[x0 | x_t] and Var[x0 | x_t] for x0 ~ N(MU, S^2), x_t = alpha x0 + sigma eps."""
    a2, s2 = jax.nn.sigmoid(lam), jax.nn.sigmoid(-lam)
    a = jnp.sqrt(a2)
    gain = a * S ** 2 / (a2 * S ** 2 + s2)
    return MU + gain * (x_t - a * MU), S ** 2 * s2 / (a2 * S ** 2 + s2)


def optimal_discrete_model(schedule, parameterization="eps", exact_variance=False):
    """model_fn(x_t, t) of the Bayes-optimal denoiser; with exact_variance it also outputs the
    true log Var[x_{t-1} | x_t] (the reverse kernel of Gaussian data is exactly Gaussian)."""

    def model_fn(x_t, t):
        lam_t = schedule.log_snr[t][:, None]
        x0, var0 = posterior_x0(x_t, lam_t)
        _, eps = diffusion.x0_eps_from_output(x0, x_t, lam_t, "x0")
        out = diffusion.output_from_x0_eps(x0, eps, x_t, lam_t, parameterization)
        if not exact_variance:
            return out
        lam_s = schedule.log_snr[t - 1][:, None]
        _, post_var, _ = diffusion.q_posterior(x0, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
        coef_x0 = jnp.sqrt(jax.nn.sigmoid(lam_s)) * -jnp.expm1(lam_t - lam_s)
        var = jnp.where(t[:, None] == 1, var0, post_var + coef_x0 ** 2 * var0)  # total variance
        return jnp.concatenate([out, jnp.log(var)], axis=-1)

    return model_fn


def gaussian_data(seed, B, D=4):
    """x0 ~ N(MU, S^2) in float32 (NumPy's generator: no compile per shape)."""
    return jnp.asarray(MU + S * np.random.default_rng(seed).standard_normal((B, D)), jnp.float32)


def true_nll(x0):
    return np.sum(-stats.norm.logpdf(np.float64(x0), MU, S), axis=1)


# ---------------------------------------------------------------------------
# Elementwise pieces.
# ---------------------------------------------------------------------------


def test_gaussian_kl_closed_form_and_monte_carlo():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    kl = float(losses.gaussian_kl(m1, lv1, m2, lv2))
    x = np.random.default_rng(0).normal(m1, math.exp(0.5 * lv1), 400_000)
    mc = stats.norm.logpdf(x, m1, math.exp(0.5 * lv1)) - stats.norm.logpdf(x, m2, math.exp(0.5 * lv2))
    assert abs(kl - mc.mean()) < 4 * mc.std() / math.sqrt(x.size)
    assert float(losses.gaussian_kl(0.1, -3.0, 0.1, -3.0)) == 0.0


def test_prior_kl_closed_form():
    x0 = jnp.array([[0.0, 1.0, -2.0], [0.5, 0.5, 0.5]])
    lam = jnp.array([-3.0, -8.0])
    a2, s2 = 1 / (1 + np.exp(-np.float64(lam)))[:, None], 1 / (1 + np.exp(np.float64(lam)))[:, None]
    want = 0.5 * np.sum(a2 * np.float64(x0) ** 2 + s2 - 1 - np.log(s2), axis=1)
    np.testing.assert_allclose(losses.prior_kl(x0, lam), want, rtol=1e-4)


def test_discretized_gaussian_matches_float64_cdf_and_normalizes():
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (6, 500)) / 127.5 - 1).astype(np.float32)
    mean = rng.normal(0, 1.5, (6, 500)).astype(np.float32)
    log_scale = np.array([-7.0, -5.0, -3.0, -1.0, 0.5, 3.0], np.float32)[:, None] * np.ones((1, 500),
                                                                                          np.float32)
    dgl = jax.jit(losses.discretized_gaussian_log_likelihood)
    got = np.asarray(dgl(x, mean, log_scale))
    xs, m, sc = np.float64(x), np.float64(mean), np.exp(np.float64(log_scale))
    lo = np.where(xs < -0.999, -np.inf, (xs - 1 / 255 - m) / sc)
    hi = np.where(xs > 0.999, np.inf, (xs + 1 / 255 - m) / sc)
    with np.errstate(divide="ignore"):
        want = np.log(np.where(lo + hi > 0, stats.norm.sf(lo) - stats.norm.sf(hi),
                               stats.norm.cdf(hi) - stats.norm.cdf(lo)))
    assert np.all(np.isfinite(got))  # finite even where the float64 CDF difference underflows
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-5, atol=2e-5)
    # The 256 bin probabilities sum to one for any mean and scale.
    grid = jnp.linspace(-1, 1, 256)[None]
    for m, ls in [(0.3, -6.0), (0.3, -2.0), (0.99, 1.0), (-3.0, 0.0), (0.1, 5.0)]:
        lp = dgl(grid, jnp.full((1, 256), m),
                                                        jnp.full((1, 256), ls))
        np.testing.assert_allclose(jax.scipy.special.logsumexp(lp), 0.0, atol=1e-5)
    g = jax.jit(jax.grad(lambda mu: dgl(x, mu, log_scale).sum()))(mean)
    assert np.all(np.isfinite(g))


def test_gaussian_log_likelihood_matches_scipy():
    x, m, ls = np.array([0.3, -2.0]), np.array([0.1, 1.0]), np.array([-1.0, 0.5])
    np.testing.assert_allclose(losses.gaussian_log_likelihood(x, m, ls),
                               stats.norm.logpdf(x, m, np.exp(ls)), rtol=1e-5)


def test_vdm_categorical_decoder_is_the_bayes_posterior_over_the_grid():
    """p(x = k | z0) proportional to N(z0; alpha_0 v_k, sigma_0^2) (Kingma et al. App. C)."""
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (3, 50))
    x0 = (k / 127.5 - 1).astype(np.float32)
    lam0 = np.array([13.3, 8.0, 2.0], np.float32)
    z0, _ = diffusion.sample_q_xt_given_x0(jax.random.PRNGKey(0), jnp.asarray(x0), lam0)
    got = losses.vdm_categorical_decoder_log_likelihood(jnp.asarray(x0), z0, lam0)
    a = np.sqrt(1 / (1 + np.exp(-np.float64(lam0))))[:, None, None]
    s = np.sqrt(1 / (1 + np.exp(np.float64(lam0))))[:, None, None]
    grid = np.linspace(-1, 1, 256)
    logits = stats.norm.logpdf(np.float64(z0)[..., None], a * grid, s)
    want = np.take_along_axis(logits, k[..., None], -1)[..., 0] - np.logaddexp.reduce(logits, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.mean(got[0])) > -1e-3  # at the VDM's lambda_0 = 13.3 the true bin takes ~all mass


# ---------------------------------------------------------------------------
# Simple losses and their weightings.
# ---------------------------------------------------------------------------


def _noisy_batch(seed, shape=(8, 5)):
    rng = np.random.default_rng(seed)
    x0, eps, noise = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    lam = jnp.linspace(-4.0, 6.0, shape[0])
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam, eps)
    return x0, eps, x_t, lam, x0 + 0.3 * noise  # an imperfect prediction


WEIGHTED = ("snr", "truncated_snr", "min_snr")


@jax.jit
def _all_simple_losses(x0, eps, x_t, lam, x0_hat):
    """Every (parameterization, target, weighting) at once, in one compile."""
    _, eps_hat = diffusion.x0_eps_from_output(x0_hat, x_t, lam, "x0")
    res = {}
    for param in diffusion.PARAMETERIZATIONS:
        out = diffusion.output_from_x0_eps(x0_hat, eps_hat, x_t, lam, param)
        res[param, param, "none"] = losses.simple_loss(out, x0, eps, x_t, lam, param)
        for target in diffusion.PARAMETERIZATIONS:
            for w in WEIGHTED:
                res[param, target, w] = losses.simple_loss(out, x0, eps, x_t, lam, param, target,
                                                           weighting=w)
    res["exact", "", ""] = losses.simple_loss(eps, x0, eps, x_t, lam, "eps", "v")
    res["l1", "", ""] = losses.simple_loss(eps_hat, x0, eps, x_t, lam, "eps", loss_type="l1")
    return res, eps_hat


def test_simple_loss_weightings_are_the_same_x0_objective_in_every_parameterization():
    x0, eps, x_t, lam, x0_hat = _noisy_batch(0)
    res, eps_hat = _all_simple_losses(x0, eps, x_t, lam, x0_hat)
    x0_mse = np.mean(np.square(np.float64(x0_hat - x0)), axis=1)
    snr = np.exp(np.float64(lam))
    want = {"snr": snr * x0_mse, "truncated_snr": np.maximum(snr, 1) * x0_mse,
            "min_snr": np.minimum(snr, 5.0) * x0_mse}
    for param in diffusion.PARAMETERIZATIONS:
        for target in diffusion.PARAMETERIZATIONS:
            for w, ref in want.items():
                np.testing.assert_allclose(res[param, target, w], ref, rtol=2e-3,
                                           err_msg=f"{param} {target} {w}")
        assert np.all(np.asarray(res[param, param, "none"]) > 0)
    # Hang et al.'s min-SNR in eps space is min(SNR, gamma)/SNR times the eps-MSE.
    eps_mse = np.mean(np.square(np.float64(eps_hat - eps)), axis=1)
    np.testing.assert_allclose(res["eps", "eps", "min_snr"], np.minimum(snr, 5.0) / snr * eps_mse,
                               rtol=2e-3)
    np.testing.assert_allclose(res["eps", "eps", "none"], eps_mse, rtol=1e-5)
    # The exact prediction has zero loss, L1 is the mean absolute error.
    assert np.allclose(res["exact", "", ""], 0, atol=1e-10)
    np.testing.assert_allclose(res["l1", "", ""], np.mean(np.abs(np.float64(eps_hat - eps)), axis=1),
                               rtol=1e-5)


def test_elbo_weighted_simple_loss_equals_vlb_terms():
    """num_dims * simple(elbo) = L_{t-1} exactly (fixed_small) or up to a model-independent
    constant (fixed_large, and the t = 1 Gaussian decoder), for every parameterization."""
    sch = schedules.discrete_schedule("cosine", 20)
    B, D = 20, 6
    t = jnp.arange(1, B + 1)
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.integers(0, 256, (B, D)) / 127.5 - 1, jnp.float32)
    eps, noise = (jnp.asarray(rng.standard_normal((2, B, D)), jnp.float32))
    lam_s, lam_t = sch.log_snr[t - 1], sch.log_snr[t]
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam_t, eps)

    @jax.jit
    def run():
        res = {}
        for vt in ("fixed_small", "fixed_large"):
            bounds = diffusion.reverse_log_variance_bounds(log_snr_s=lam_s, log_snr_t=lam_t,
                                                           log_snr_next=sch.log_snr[jnp.minimum(t + 1, 20)])
            log_var = diffusion.fixed_log_variance(vt, *bounds, lam_s)
            gaps = []
            for i, param in enumerate(["eps", "x0", "v"]):
                out = diffusion.convert(eps + (0.05 + 0.1 * i) * jnp.roll(noise, i, axis=1), x_t, lam_t,
                                        "eps", param)
                vlb = losses.vlb_term(out, x0, x_t, t, sch, param, vt, "gaussian")
                simple = losses.simple_loss(out, x0, eps, x_t, lam_t, param, weighting="elbo",
                                            log_snr_s=lam_s, log_variance=log_var)
                gaps.append(vlb - D * simple)
            res[vt] = (jnp.stack(gaps), losses.vlb_term(out, x0, x_t, t, sch, "v", vt, "discretized"),
                       losses.vlb_term(out, x0, x_t, t, sch, "v", vt, "gaussian"))
        # Gradients stay finite at every t, the t = 1 decoder included, for learned variances too.
        out2 = jnp.concatenate([out, jnp.tanh(noise)], axis=-1)
        grads = [jax.grad(lambda o: losses.vlb_term(o, x0, x_t, t, sch, "v", vt, dec).sum())(out2)
                 for vt in ("learned_range", "learned") for dec in losses.DECODERS]
        return res, jnp.stack(grads)

    res, grads = run()
    assert np.all(np.isfinite(grads)) and np.all(np.any(grads != 0, axis=(1, 2)))
    for vt, (gaps, vlb_d, vlb_g) in res.items():
        gaps = np.float64(gaps)
        assert np.all(np.abs(gaps - gaps[0]) <= 1e-3 * (1 + np.abs(gaps[0]))), (vt, gaps)
        if vt == "fixed_small":
            np.testing.assert_allclose(gaps[:, 1:], 0.0, atol=1e-3)  # pure KL terms, t >= 2
        # The discretized decoder changes only the t = 1 term, which stays finite.
        np.testing.assert_allclose(vlb_d[1:], vlb_g[1:])
        assert np.isfinite(vlb_d[0]) and vlb_d[0] != vlb_g[0]


# ---------------------------------------------------------------------------
# The discrete ELBO with the optimal denoiser of Gaussian data.
# ---------------------------------------------------------------------------

B_ELBO = 1024


@pytest.fixture(scope="module")
def elbo_results():
    x0 = gaussian_data(0, B_ELBO)
    res = {}
    for T in (50, 200, 1000):
        sch = schedules.discrete_schedule("linear", T)
        res[T] = jax.jit(lambda k, x, sch=sch: losses.discrete_elbo(
            optimal_discrete_model(sch), k, x, sch, decoder="gaussian", chunk=25))(
            jax.random.PRNGKey(1), x0)
    return x0, res


def test_elbo_bounds_the_nll_and_tightens_with_T(elbo_results):
    x0, res = elbo_results
    nll = true_nll(x0)
    gaps, errs = [], []
    for T, r in sorted(res.items()):
        assert all(np.all(np.isfinite(np.asarray(v))) for v in r.values())
        gap = np.float64(r["total"]) - nll
        gaps.append(gap.mean())
        errs.append(gap.std() / math.sqrt(B_ELBO))
    # E[-ELBO] >= E[-log p_theta] >= H(data) = E[true NLL]
    assert all(g > 4 * e for g, e in zip(gaps, errs)), (gaps, errs)
    # ... and the gap shrinks as T grows (the same total noise in finer steps).
    assert gaps[0] - gaps[1] > 4 * math.hypot(errs[0], errs[1]), (gaps, errs)
    assert gaps[1] - gaps[2] > 4 * math.hypot(errs[1], errs[2]), (gaps, errs)


def test_elbo_per_term_sum_equals_total(elbo_results):
    _, res = elbo_results
    for T, r in res.items():
        assert r["diffusion"].shape == (B_ELBO, T)
        np.testing.assert_array_equal(r["diffusion"][:, 0], 0.0)
        np.testing.assert_allclose(r["total"], r["prior"] + r["diffusion"].sum(1) + r["decoder"],
                                   rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(r["diffusion"][:, 1:]) >= -1e-4)  # KLs
        assert np.all(np.asarray(r["prior"]) >= 0)


def test_elbo_terms_are_vlb_terms_at_each_t():
    """discrete_elbo's column t-1 is vlb_term at t with the same x_t (key folded with t)."""
    sch = schedules.discrete_schedule("cosine", 7)
    x0 = gaussian_data(4, 3)
    model = optimal_discrete_model(sch, "v")
    key = jax.random.PRNGKey(5)

    @jax.jit
    def run():
        r = losses.discrete_elbo(model, key, x0, sch, parameterization="v", decoder="gaussian",
                                 chunk=3)
        def term(t):
            eps = jax.random.normal(jax.random.fold_in(key, t), x0.shape)
            tt = jnp.full((3,), t)
            x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, sch.log_snr[tt], eps)
            return losses.vlb_term(model(x_t, tt), x0, x_t, tt, sch, "v", "fixed_small", "gaussian")

        return r, jax.vmap(term, out_axes=1)(jnp.arange(1, 8))

    r, terms = run()
    np.testing.assert_allclose(r["decoder"], terms[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["diffusion"][:, 1:], terms[:, 1:], rtol=1e-5, atol=1e-6)


def test_exact_reverse_kernel_makes_the_elbo_tight():
    """Gaussian data have Gaussian reverse kernels: with the true mean and a free learned
    variance equal to the true one, -ELBO - NLL is only the tiny prior mismatch."""
    sch = schedules.discrete_schedule("linear", 100)
    x0 = gaussian_data(6, 512)
    r = jax.jit(lambda k: losses.discrete_elbo(optimal_discrete_model(sch, exact_variance=True),
                                               k, x0, sch, variance_type="learned",
                                               decoder="gaussian", chunk=50))(jax.random.PRNGKey(7))
    gap = np.float64(r["total"]) - true_nll(x0)
    assert abs(gap.mean()) < max(4 * gap.std() / math.sqrt(gap.size), 2e-3), gap.mean()


def test_monte_carlo_elbo_is_unbiased_and_importance_sampling_reduces_variance(elbo_results):
    x0, res = elbo_results
    x0 = x0[:64]
    exact = np.float64(res[200]["total"][:64]).mean()
    sch = schedules.discrete_schedule("linear", 200)
    model = optimal_discrete_model(sch)
    terms = np.float64(res[200]["diffusion"]).mean(0)
    terms[0] = np.float64(res[200]["decoder"]).mean()
    mc_fn = jax.jit(lambda k, p: losses.discrete_elbo_mc(model, k, x0, sch, 64, decoder="gaussian",
                                                         importance=p))
    for importance in (np.full(200, 1 / 200), np.abs(terms)):  # uniform, then ~ E[L_t]
        mc = mc_fn(jax.random.PRNGKey(8), importance)
        est = np.float64(mc["total"]).mean()
        # The per-example estimates are independent: the batch mean's error is
        # sqrt(mean(stderr^2) / B) plus the spread of the exact ELBO's own x_t draws.
        se = math.sqrt(np.mean(np.float64(mc["stderr"]) ** 2) / 64 + np.var(res[200]["total"][:64]) / 64)
        assert abs(est - exact) < 4 * se, (est, exact, se)
        if importance[0] == importance[-1]:
            se_uniform = float(np.mean(mc["stderr"]))
        else:
            assert float(np.mean(mc["stderr"])) < se_uniform / 3


# ---------------------------------------------------------------------------
# Loss-history importance sampler (Nichol & Dhariwal §3.3).
# ---------------------------------------------------------------------------


def test_loss_history_sampler():
    T, H = 5, 3
    update = jax.jit(losses.loss_history_update)
    probs = jax.jit(losses.loss_history_probs)
    sample = jax.jit(losses.loss_history_sample, static_argnums=2)
    state = losses.loss_history_init(T, H)
    t, w = sample(state, jax.random.PRNGKey(0), 1000)
    assert np.all(np.asarray(w) == 1) and set(np.asarray(t)) == set(range(1, T + 1))
    # Fill every timestep but one: still uniform.
    state = update(state, jnp.repeat(jnp.arange(1, T), H),
                                       jnp.repeat(jnp.arange(1.0, T), H))
    np.testing.assert_allclose(probs(state), 1 / T)
    # Timestep 5 gets an old value that the ring buffer must drop, then three values of 10.
    state = update(state, jnp.full((4,), 5), jnp.array([99.0, 10, 10, 10]))
    p = np.asarray(probs(state, uniform_prob=0.0))
    np.testing.assert_allclose(p, np.array([1, 2, 3, 4, 10]) / 20, rtol=1e-6)
    p = np.asarray(probs(state))
    t, w = sample(state, jax.random.PRNGKey(1), 200_000)
    freq = np.bincount(np.asarray(t), minlength=T + 1)[1:] / t.size
    np.testing.assert_allclose(freq, p, atol=5e-3)
    np.testing.assert_allclose(w, 1 / (T * p[np.asarray(t) - 1]), rtol=1e-6)
    # Importance weights keep the objective unbiased: E_p[w L_t] = mean_t L_t.
    L = np.array([1.0, 2, 3, 4, 10])
    assert math.isclose(np.sum(p * (1 / (T * p)) * L), L.mean(), rel_tol=1e-6)


# ---------------------------------------------------------------------------
# discrete_loss: kinds, the hybrid stop-gradient, jit/vmap/grad.
# ---------------------------------------------------------------------------


def _param_model(schedule):
    """A model with a mean parameter and a variance parameter (learned_range output)."""

    def make(params):
        base = optimal_discrete_model(schedule)

        def model_fn(x_t, t):
            mean = base(x_t, t) * params["m"]
            return jnp.concatenate([mean, jnp.full_like(mean, params["v"])], axis=-1)

        return model_fn

    return make


def test_hybrid_loss_stops_the_gradient_of_the_mean_in_the_vlb_term():
    sch = schedules.discrete_schedule("cosine", 50)
    make = _param_model(sch)
    x0 = gaussian_data(0, 16)
    params = {"m": 1.1, "v": 0.2}
    kw = dict(parameterization="eps", variance_type="learned_range", decoder="gaussian")

    def loss(p):
        out, metrics = losses.discrete_loss(make(p), jax.random.PRNGKey(1), x0, sch, kind="hybrid",
                                            **kw)
        return jnp.stack([jnp.mean(out), jnp.mean(metrics["simple"])]), (out, metrics)

    # d(hybrid)/dp and d(simple part)/dp in one compile.
    g, (out, m) = jax.jit(jax.jacrev(loss, has_aux=True))(params)
    np.testing.assert_allclose(g["m"][0], g["m"][1], rtol=1e-5)  # mean: only L_simple's gradient
    assert float(g["v"][1]) == 0 and abs(float(g["v"][0])) > 0   # variance: only L_vlb's
    np.testing.assert_allclose(out, m["simple"] + 1e-3 * 50 * m["vlb_term"] / (4 * math.log(2)),
                               rtol=1e-5)


def test_vlb_kind_is_an_unbiased_bits_per_dim_estimate(elbo_results):
    x0, res = elbo_results
    sch = schedules.discrete_schedule("linear", 200)
    f = jax.jit(lambda k: losses.discrete_loss(optimal_discrete_model(sch), k, x0, sch, kind="vlb",
                                               decoder="gaussian")[0])
    est = np.concatenate([np.float64(f(jax.random.PRNGKey(i))) for i in range(4)])
    exact = np.float64(losses.bits_per_dim(res[200]["total"], 4))
    se = math.hypot(est.std() / math.sqrt(est.size), exact.std() / math.sqrt(exact.size))
    assert abs(est.mean() - exact.mean()) < 4 * se, (est.mean(), exact.mean(), se)


def test_discrete_loss_traced_t_does_not_retrace_and_vmaps():
    sch = schedules.discrete_schedule("cosine", 30)
    model = optimal_discrete_model(sch)
    x0 = gaussian_data(0, 8)
    traces = []

    @jax.jit
    def f(key, t, w):
        traces.append(1)
        return losses.discrete_loss(model, key, x0, sch, weighting="min_snr", t=t, weights=w)[0]

    for i in range(3):
        t = np.random.default_rng(i).integers(1, 31, 8).astype(np.int32)
        out = f(jax.random.PRNGKey(i), t, jnp.full((8,), 0.5 + i))
    assert len(traces) == 1 and np.all(np.isfinite(out))
    per_key = jax.jit(jax.vmap(lambda k: losses.discrete_loss(model, k, x0, sch)[0]))(
        jax.random.split(jax.random.PRNGKey(0), 3))
    assert per_key.shape == (3, 8) and np.all(np.isfinite(per_key))


# ---------------------------------------------------------------------------
# The VDM loss in continuous time and its T-step form.
# ---------------------------------------------------------------------------

LAM_MAX, LAM_MIN, D_VDM = 13.3, -5.0, 4


def optimal_vdm_model(log_snr_fn):
    def model_fn(z_t, t):
        lam = log_snr_fn(t)[:, None]
        x0, _ = posterior_x0(z_t, lam)
        return x0

    return model_fn


def expected_diffusion_loss(T):
    """E[diffusion term] for the optimal denoiser: 0.5 D sum_i (SNR_s - SNR_t) Var[x0 | z_t]
    (T steps, eq. 15), or 0.5 D log((1 + SNR_max S^2)/(1 + SNR_min S^2)) in the limit (eq. 17)."""
    if T == 0:
        return 0.5 * D_VDM * math.log((1 + math.exp(LAM_MAX) * S ** 2) / (1 + math.exp(LAM_MIN) * S ** 2))
    snr = np.exp(LAM_MAX + (LAM_MIN - LAM_MAX) * np.arange(T + 1) / T)
    return 0.5 * D_VDM * np.sum((snr[:-1] - snr[1:]) * S ** 2 / (1 + snr[1:] * S ** 2))


@pytest.fixture(scope="module")
def vdm_runs():
    """4 batches of vdm_loss for two schedules with the same endpoints (continuous time) and
    for the linear one with T = 10."""
    x0 = gaussian_data(9, 2048, D_VDM)
    scheds = {"linear": schedules.continuous_schedule("vdm_linear"),
              "cosine": schedules.continuous_schedule("cosine", log_snr_max=LAM_MAX,
                                                      log_snr_min=LAM_MIN)}
    out = {}
    for name, T in (("linear", 0), ("cosine", 0), ("linear", 10)):
        f = jax.jit(lambda k, fn=scheds[name], T=T: losses.vdm_loss(
            optimal_vdm_model(fn), fn, k, x0, T=T, parameterization="x0", decoder="gaussian"))
        out[name, T] = [f(k) for k in jax.random.split(jax.random.PRNGKey(T), 4)]
    return x0, out


def _mean_se(runs, field):
    v = np.concatenate([np.float64(m[field]) for _, m in runs])
    return v.mean(), v.std() / math.sqrt(v.size)


def test_vdm_continuous_loss_is_invariant_to_the_schedule_interior(vdm_runs):
    """Kingma et al. §5.1: L_inf depends on the schedule only through its endpoints."""
    _, out = vdm_runs
    m_lin, se_lin = _mean_se(out["linear", 0], "diffusion")
    m_cos, se_cos = _mean_se(out["cosine", 0], "diffusion")
    want = expected_diffusion_loss(0)
    assert abs(m_lin - m_cos) < 4 * math.hypot(se_lin, se_cos), (m_lin, m_cos)
    assert abs(m_lin - want) < 4 * se_lin and abs(m_cos - want) < 4 * se_cos, (m_lin, m_cos, want)


def test_vdm_discrete_T_form_matches_its_closed_form_and_bounds_the_continuous(vdm_runs):
    """Eq. 15 for the linear schedule; L_T >= L_inf (Kingma et al. §4.1)."""
    _, out = vdm_runs
    m, se = _mean_se(out["linear", 10], "diffusion")
    assert abs(m - expected_diffusion_loss(10)) < 4 * se
    assert expected_diffusion_loss(10) > expected_diffusion_loss(0)


def test_vdm_prior_decoder_and_antithetic_times(vdm_runs):
    x0, out = vdm_runs
    total, m = out["linear", 0][0]
    np.testing.assert_allclose(total, m["prior"] + m["diffusion"] + m["decoder"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["prior"], losses.prior_kl(x0, LAM_MIN), rtol=1e-5)
    t = np.sort(np.asarray(m["t"]))
    np.testing.assert_allclose(np.diff(t), 1 / t.size, atol=1e-5)  # evenly spread times
    # Gaussian decoder: -log N(x; z0/alpha0, 1/SNR_0), E = 0.5 D (1 + log(2 pi / SNR_0)).
    want = 0.5 * D_VDM * (1 + math.log(2 * math.pi) - LAM_MAX)
    assert abs(float(jnp.mean(m["decoder"])) - want) < 0.05


def test_vdm_loss_gradients_reach_a_learned_schedule_and_the_categorical_decoder_works():
    x0 = jnp.round(gaussian_data(0, 16) * 127.5).clip(-127.5, 127.5) / 127.5

    def loss(params, T):
        fn = lambda t: params["lmax"] + (params["lmin"] - params["lmax"]) * t
        model = lambda z, t: params["w"] * z
        return jnp.mean(losses.vdm_loss(model, fn, jax.random.PRNGKey(1), x0, T=T,
                                        decoder="categorical")[0])

    params = {"lmax": 10.0, "lmin": -6.0, "w": 0.5}
    both = lambda p: jnp.stack([loss(p, 0), loss(p, 1000)])
    # Continuous time and T = 1000 in one compile: rows of the Jacobian, and central differences
    # (the key fixes t and the noise, so the loss is smooth in the parameters; step 0.1 keeps the
    # float32 rounding of a loss of ~10^3 nats small against the difference).
    g, fd = jax.jit(lambda p: (jax.jacrev(both)(p), {
        k: (both({**p, k: p[k] + 0.1}) - both({**p, k: p[k] - 0.1})) / 0.2 for k in p}))(params)
    for k in params:
        np.testing.assert_allclose(g[k], fd[k], rtol=2e-2, atol=1e-3, err_msg=k)
        assert np.all(np.abs(g[k]) > 1e-3), (k, g[k])  # the gradient reaches every parameter


def test_given_times_and_noise_replace_the_draws_from_the_key():
    """Per-example u / t and noise (as the training loop draws them) make the key irrelevant."""
    x0 = gaussian_data(1, 6)
    rng = np.random.default_rng(2)
    u, eps, eps_0 = rng.uniform(size=6), rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    fn = schedules.continuous_schedule("vdm_linear")
    sch = schedules.discrete_schedule("cosine", 10)
    t = jnp.asarray(rng.integers(1, 11, 6), jnp.int32)

    @jax.jit
    def run(key):
        v = losses.vdm_loss(optimal_vdm_model(fn), fn, key, x0, u=u, eps=eps, eps_0=eps_0,
                            decoder="gaussian")[0]
        d = losses.discrete_loss(optimal_discrete_model(sch), key, x0, sch, t=t, eps=eps)[0]
        return v, d

    (v1, d1), (v2, d2) = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(d1, d2)
    with pytest.raises(ValueError, match=r"u must have shape \[B\]"):
        losses.vdm_loss(optimal_vdm_model(fn), fn, jax.random.PRNGKey(0), x0, u=u[:3])


def test_bits_per_dim():
    np.testing.assert_allclose(losses.bits_per_dim(jnp.array([3072 * math.log(2)]), 3072), 1.0)


# ---------------------------------------------------------------------------
# Bad arguments.
# ---------------------------------------------------------------------------


def test_bad_arguments_raise_value_error_naming_them():
    sch = schedules.discrete_schedule("cosine", 10)
    x0 = jnp.zeros((4, 3))
    model = lambda x, t: x
    cases = [
        (dict(kind="elbo"), r"kind must be one of \('simple', 'hybrid', 'vlb'\)"),
        (dict(weighting="p2"), r"weighting must be one of .*'min_snr'"),
        (dict(loss_type="huber"), r"loss_type must be one of \('l2', 'l1'\)"),
        (dict(decoder="categorical"), r"decoder must be one of \('discretized', 'gaussian'\)"),
        (dict(parameterization="mu"), r"parameterization must be one of"),
        (dict(variance_type="big"), r"variance type must be one of"),
        (dict(t=jnp.array([0, 1, 2, 3])), r"1\.\.10"),
        (dict(t=jnp.array([1, 2, 3, 11])), r"1\.\.10"),
        (dict(t=jnp.array([1, 2])), r"t must have shape"),
        (dict(variance_type="learned_range"), r"kind 'simple' does not train the variance"),
        (dict(loss_type="l1", weighting="snr"), r"loss_type 'l1' allows weighting 'none'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            losses.discrete_loss(model, jax.random.PRNGKey(0), x0, sch, **kw)
    eps = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="same shape"):
        losses.simple_loss(x0, x0, eps, x0, 0.0, "eps")
    with pytest.raises(ValueError, match="log_snr_s"):
        losses.simple_loss(x0, x0, x0, x0, 0.0, "eps", weighting="elbo")
    with pytest.raises(ValueError, match="target must be one of"):
        losses.simple_loss(x0, x0, x0, x0, 0.0, "eps", target="mean")
    with pytest.raises(ValueError, match="twice the data"):
        losses.vlb_term(x0, x0, x0, jnp.array([1, 2, 3, 4]), sch, "eps", "learned", "gaussian")
    with pytest.raises(ValueError, match="num_samples"):
        losses.discrete_elbo_mc(model, jax.random.PRNGKey(0), x0, sch, 1)
    with pytest.raises(ValueError, match="importance"):
        losses.discrete_elbo_mc(model, jax.random.PRNGKey(0), x0, sch, 4, importance=jnp.ones(9))
    zero_at_one = np.concatenate([[0.0], np.ones(sch.T - 1)])
    with pytest.raises(ValueError, match="positive at every t"):
        losses.discrete_elbo_mc(model, jax.random.PRNGKey(0), x0, sch, 4, importance=zero_at_one)
    traced = jax.jit(lambda p: losses.discrete_elbo_mc(model, jax.random.PRNGKey(0), x0, sch, 4,
                                                       importance=p)["total"])(zero_at_one)
    assert np.all(np.isnan(traced))
    with pytest.raises(ValueError, match="chunk"):
        losses.discrete_elbo(model, jax.random.PRNGKey(0), x0, sch, chunk=0)
    with pytest.raises(ValueError, match=r"T must be 0 \(continuous time\)"):
        losses.vdm_loss(model, lambda t: -t, jax.random.PRNGKey(0), x0, T=-1)
    with pytest.raises(ValueError, match=r"decoder must be one of \('categorical'"):
        losses.vdm_loss(model, lambda t: -t, jax.random.PRNGKey(0), x0, decoder="x")
    with pytest.raises(ValueError, match="num_dims"):
        losses.bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="history"):
        losses.loss_history_init(10, 0)


def test_discrete_loss_weights_scale_each_example():
    """``weights`` (importance weights 1 / (T p(t))) multiply each example's loss: the same t
    and noise with weights w give w times the unweighted per-example loss."""
    sch = schedules.discrete_schedule("cosine", 10)
    x0 = gaussian_data(3, 6)
    t = jnp.asarray([1, 2, 3, 5, 8, 10], jnp.int32)
    eps = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    w = jnp.asarray([0.5, 1.0, 2.0, 3.0, 0.25, 1.5])
    for kind in ("simple", "vlb"):
        run = lambda weights: losses.discrete_loss(optimal_discrete_model(sch), jax.random.PRNGKey(0), x0, sch,
                                                   kind=kind, decoder="gaussian", t=t, weights=weights, eps=eps)[0]
        plain, weighted = np.asarray(run(None)), np.asarray(run(w))
        assert np.all(np.abs(plain) > 0)
        np.testing.assert_allclose(weighted, np.asarray(w) * plain, rtol=1e-5, err_msg=kind)


# ---------------------------------------------------------------------------
# The t = 1 convention of improved-diffusion, and the stored float64 tables.
# ---------------------------------------------------------------------------


def _iddpm_betas(name, T):
    """improved-diffusion's get_named_beta_schedule in float64 (written from the paper)."""
    if name == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(T, dtype=np.float64)
    return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)


def _iddpm_tables(betas):
    """0-indexed float64 tables of improved-diffusion's GaussianDiffusion.__init__."""
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    return dict(ab=ab, post_var=post_var,
                post_logvar_clipped=np.log(np.append(post_var[1], post_var[1:])),
                fixed_large_logvar=np.log(np.append(post_var[1], betas[1:])),
                coef1=betas * np.sqrt(ab_prev) / (1 - ab),
                coef2=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab))


def _discretized_nll_f64(x, mean, log_scale):
    """-sum log P(x) of Ho et al. eq. 13 in float64 (exact normal CDF; the edge bins open)."""
    x, mean, scale = np.float64(x), np.float64(mean), np.exp(np.float64(log_scale))
    hi = np.where(x > 0.999, np.inf, (x + 1 / 255 - mean) / scale)
    lo = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mean) / scale)
    return -np.sum(np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)), axis=-1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_decoder_term_matches_improved_diffusion(name):
    """L_0 of fixed_small and fixed_large uses log beta~_2 (improved-diffusion's clipped posterior
    log-variance and its fixed_large table), matching a float64 reference to float32 rounding."""
    T = 1000
    ref = _iddpm_tables(_iddpm_betas(name, T))
    sch = schedules.discrete_schedule(name, T)
    rng = np.random.default_rng(11)
    x0 = rng.integers(0, 256, (8, 12)) / 127.5 - 1
    x0_hat = np.clip(x0 + 0.01 * rng.standard_normal(x0.shape), -1, 1)
    t = jnp.ones((8,), jnp.int32)
    for vt, table in [("fixed_small", "post_logvar_clipped"), ("fixed_large", "fixed_large_logvar")]:
        ours = losses.vlb_term(jnp.asarray(x0_hat, jnp.float32), jnp.asarray(x0, jnp.float32),
                               jnp.zeros(x0.shape, jnp.float32), t, sch, "x0", vt, "discretized")
        # p(x_0 | x_1): mean coef1[0] x0_hat + coef2[0] x_1, log-variance table[0].
        mean = ref["coef1"][0] * x0_hat + ref["coef2"][0] * 0.0
        want = _discretized_nll_f64(x0, mean, 0.5 * ref[table][0])
        np.testing.assert_allclose(ours, want, rtol=2e-6, err_msg=vt)
    assert ref["fixed_large_logvar"][0] < np.log(_iddpm_betas(name, T)[0])  # beta~_2 < beta_1: not beta_1


def test_learned_range_decoder_variance_gets_a_gradient_at_t1():
    """At t = 1 learned_range interpolates between log beta~_2 and log beta_1, so the decoder term
    depends on the variance output (a zero gradient would leave the decoder variance unlearned)."""
    sch = schedules.discrete_schedule("cosine", 50)
    rng = np.random.default_rng(12)
    x0 = jnp.asarray(rng.integers(0, 256, (4, 6)) / 127.5 - 1, jnp.float32)
    x0_hat = x0 + 0.02 * jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.ones((4,), jnp.int32)
    for dec in losses.DECODERS:
        g = jax.grad(lambda v: losses.vlb_term(jnp.concatenate([x0_hat, v], -1), x0, x0, t, sch, "x0",
                                               "learned_range", dec).sum())(jnp.zeros_like(x0))
        assert np.all(np.isfinite(g)) and np.all(g != 0), dec


@pytest.mark.parametrize("name,T", [("linear", 1000), ("cosine", 4000)])
def test_reverse_step_tables_are_exact_to_float32(name, T):
    """The discrete step reads the stored float64-derived tables: beta, the clipped posterior
    log-variance and the posterior mean coefficients agree with float64 to float32 rounding."""
    ref = _iddpm_tables(_iddpm_betas(name, T))
    sch = schedules.discrete_schedule(name, T)
    t = jnp.arange(1, T + 1)
    tab = schedules.reverse_step_tables(sch, t)
    np.testing.assert_allclose(tab.coef_x0, ref["coef1"], rtol=3e-7)
    np.testing.assert_allclose(tab.coef_xt, ref["coef2"], rtol=3e-7, atol=1e-30)
    np.testing.assert_allclose(tab.log_var_min, ref["post_logvar_clipped"], rtol=3e-7, atol=3e-7)
    np.testing.assert_allclose(tab.log_var_max, np.log(_iddpm_betas(name, T)), rtol=3e-7, atol=3e-7)
    # The KL term's posterior mean through the tables is the float64 one to float32 rounding.
    rng = np.random.default_rng(13)
    x0, x_t = rng.standard_normal((2, T, 3))
    mean, _, _ = diffusion.p_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32),
                                           "x0", "fixed_small", log_snr_s=sch.log_snr[t - 1],
                                           log_snr_t=sch.log_snr[t], tables=tab)
    want = ref["coef1"][:, None] * x0 + ref["coef2"][:, None] * x_t
    np.testing.assert_allclose(mean, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", [s for s in schedules.CONTINUOUS_SCHEDULES if s != "flow"])
def test_vdm_loss_is_finite_for_every_schedule_decoder_and_parameterization(name):
    """Every continuous VP schedule has finite log-SNR ends (vp_linear from score_sde's t_min = 1e-5),
    so vdm_loss, whose decoder sits at t = 0 and prior at t = 1, has a finite value and gradient
    for every decoder and parameterization, in continuous time and its T-step form. (The 'flow'
    path's ends are +-inf by definition; validation refuses the VDM loss on it, test_paths.)"""
    fn = schedules.continuous_schedule(name)
    rng = np.random.default_rng(14)
    x0 = jnp.asarray(rng.integers(0, 256, (4, 5)) / 127.5 - 1, jnp.float32)
    u = jnp.array([0.0, 1e-6, 0.5, 1.0 - 1e-7])  # both ends included

    @jax.jit
    def run(w):
        out = {}
        for dec in losses.VDM_DECODERS:
            for param in diffusion.PARAMETERIZATIONS:
                for T in (0, 10):
                    f = lambda w_: losses.vdm_loss(lambda z, t: jnp.tanh(w_ * z + t[:, None]), fn,
                                                   jax.random.PRNGKey(0), x0, T=T, u=u,
                                                   parameterization=param, decoder=dec)[0].sum()
                    out[dec, param, T] = jax.value_and_grad(f)(w)
        return out

    for k, (v, g) in run(jnp.float32(0.3)).items():
        assert np.isfinite(v) and np.isfinite(g), (name, k, v, g)


# ---------------------------------------------------------------------------
# The variance-minimizing schedule gradient and the exact T-step VDM bound.
# ---------------------------------------------------------------------------


def _learned_schedule(seed, hidden=8):
    from vdm.models import schedule_net

    net = schedule_net.LearnedLogSNR(LAM_MAX, LAM_MIN, hidden=hidden, learn_endpoints=True)
    return net, net.init(jax.random.PRNGKey(seed), jnp.zeros((2,)))["params"]


@pytest.mark.parametrize("T", [0, 10])
def test_variance_schedule_gradient_changes_only_the_interior_gradient(T):
    """Kingma et al. §5.2: same value; the model and the endpoints get the loss gradient, the
    schedule's interior the gradient of E[L_diff^2] (d Var / d eta, as E[L] does not depend on it)."""
    from vdm.models import schedule_net

    net, sched = _learned_schedule(0)
    x0 = gaussian_data(3, 64, D_VDM)

    def run(params, mode, squared=False):
        fn = lambda t: net.apply({"params": params["s"]}, t)
        fixed = lambda t: net.apply({"params": schedule_net.stop_endpoint_gradients(params["s"])}, t)
        model = lambda z, t: params["w"] * posterior_x0(z, fn(t)[:, None])[0]
        total, m = losses.vdm_loss(model, fn, jax.random.PRNGKey(1), x0, T=T, parameterization="x0",
                                   decoder="gaussian", schedule_gradient=mode, shape_log_snr_fn=fixed)
        return jnp.mean(m["diffusion"] ** 2) if squared else jnp.mean(total)

    params = {"s": sched, "w": jnp.float32(0.9)}
    value, g_loss = jax.value_and_grad(run)(params, "loss")
    value_var, g_var = jax.value_and_grad(run)(params, "variance")
    g_square = jax.grad(run)(params, "loss", True)
    np.testing.assert_allclose(value_var, value, rtol=1e-6)
    np.testing.assert_allclose(g_var["w"], g_loss["w"], rtol=1e-5)
    for end in ("log_snr_max", "log_span"):
        np.testing.assert_allclose(g_var["s"][end], g_loss["s"][end], rtol=1e-4)
    for layer in ("l1", "l2", "l3"):
        for name, g in g_var["s"][layer].items():
            np.testing.assert_allclose(g, g_square["s"][layer][name], rtol=5e-3, atol=1e-4 * np.abs(g).max())
            assert not np.allclose(g, g_loss["s"][layer][name], rtol=0.1)


def test_continuous_vdm_loss_is_invariant_to_a_learned_interior():
    """The property the variance gradient rests on (§5.1): two learned schedules with the same
    endpoints give the same expected continuous-time loss, the closed form for Gaussian data."""
    x0 = gaussian_data(5, 4096, D_VDM)
    want = expected_diffusion_loss(0)
    for seed in (0, 1):
        net, sched = _learned_schedule(seed, hidden=16)
        fn = lambda t: net.apply({"params": sched}, t)
        _, m = jax.jit(lambda k: losses.vdm_loss(optimal_vdm_model(fn), fn, k, x0, parameterization="x0",
                                                 decoder="gaussian", schedule_gradient="variance"))(
            jax.random.PRNGKey(seed))
        d = np.float64(m["diffusion"])
        assert abs(d.mean() - want) < 4 * d.std() / math.sqrt(d.size), (seed, d.mean(), want)


def test_vdm_elbo_exact_sums_the_T_step_bound():
    """losses.vdm_elbo_exact: the same per-term noise whatever the chunking; its diffusion sum
    matches eq. 15's closed form for Gaussian data and the Monte-Carlo T-step vdm_loss."""
    fn = schedules.continuous_schedule("vdm_linear")
    x0 = gaussian_data(9, 512, D_VDM)
    model = optimal_vdm_model(fn)
    T = 10
    exact = lambda chunk: jax.jit(lambda k: losses.vdm_elbo_exact(
        model, fn, k, x0, T, chunk=chunk, parameterization="x0", decoder="gaussian"))(jax.random.PRNGKey(0))
    a, b = exact(3), exact(10)
    np.testing.assert_allclose(a["total"], b["total"], rtol=1e-4)
    np.testing.assert_allclose(a["total"], a["prior"] + a["diffusion"] + a["decoder"], rtol=1e-5)
    d = np.float64(a["diffusion"])
    se = d.std() / math.sqrt(d.size)
    assert abs(d.mean() - expected_diffusion_loss(T)) < 4 * se
    _, m = jax.jit(lambda k: losses.vdm_loss(model, fn, k, x0, T=T, parameterization="x0",
                                             decoder="gaussian"))(jax.random.PRNGKey(1))
    mc = np.float64(m["diffusion"])
    assert abs(d.mean() - mc.mean()) < 4 * math.hypot(se, mc.std() / math.sqrt(mc.size))
    assert se < mc.std() / math.sqrt(mc.size)  # summing over t removes its Monte-Carlo noise
