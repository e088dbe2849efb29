"""Forward process, posteriors and parameterizations: Monte Carlo, Bayes' rule, identities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import diffusion, schedules

SCHED = schedules.discrete_schedule("cosine", 20)
LAM = np.asarray(SCHED.log_snr, np.float64)


def sig(z):
    return 1 / (1 + np.exp(-z))


def log_normal(x, mean, var):
    x, mean, var = (np.float64(a) for a in (x, mean, var))
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


# ---------------------------------------------------------------------------
# Forward process.
# ---------------------------------------------------------------------------


def test_forward_chain_reproduces_the_moments_of_q_xt_given_x0():
    """Chaining q(x_t | x_{t-1}) from x_0 (one lax.scan) has the moments of q(x_t | x_0)."""
    N = 20_000
    x0 = jnp.tile(jnp.array([[-1.0, 0.5, 2.0]]), (N, 1))
    xs = np.float64(jax.jit(diffusion.forward_chain)(jax.random.PRNGKey(0), x0, SCHED.log_snr))
    assert xs.shape == (21, N, 3)
    np.testing.assert_array_equal(xs[0], x0)
    mean, var = diffusion.q_xt_given_x0(jnp.broadcast_to(x0[0], (21, 3)), SCHED.log_snr)  # [T+1, 3]
    mean, var = np.float64(mean), np.float64(var)
    sd = np.sqrt(var[1:])
    assert np.all(np.abs(xs[1:].mean(1) - mean[1:]) < 5 * sd / np.sqrt(N))
    assert np.all(np.abs(xs[1:].var(1) / var[1:] - 1) < 5 * np.sqrt(2 / N))
    # Markov structure: Cov(x_{t-1}, x_t) = alpha_{t|t-1} Var(x_{t-1}).
    cov = ((xs[1:-1] - xs[1:-1].mean(1, keepdims=True)) * (xs[2:] - xs[2:].mean(1, keepdims=True))).mean(1)
    a_ts = np.sqrt(sig(LAM[2:]) / sig(LAM[1:-1]))[:, None]
    assert np.all(np.abs(cov - a_ts * var[1:-1]) < 5 * np.sqrt(2 * var[1:-1] * var[2:] / N))


def test_one_step_transition_is_ho_et_al_eq_2():
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..T (including t = 1)."""
    x = jnp.linspace(-2, 2, 21)[:, None]
    t = np.arange(1, 21)
    mean, var = diffusion.q_xt_given_xs(x[1:], log_snr_s=SCHED.log_snr[t - 1], log_snr_t=SCHED.log_snr[t])
    betas = np.float64(SCHED.betas[1:])[:, None]
    np.testing.assert_allclose(mean, np.sqrt(1 - betas) * np.float64(x[1:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, betas, rtol=1e-5)


# ---------------------------------------------------------------------------
# Posterior q(x_s | x_t, x_0).
# ---------------------------------------------------------------------------

PAIRS = [(t - 1, t) for t in (2, 5, 20)] + [(3, 9), (0, 1), (0, 7)]


def test_posterior_satisfies_bayes_rule_at_random_points():
    """q(x_s | x_t, x_0) q(x_t | x_0) = q(x_t | x_s) q(x_s | x_0) for s < t (s = t-1 and strided)."""
    rng = np.random.default_rng(0)
    for s, t in [p for p in PAIRS if p[0] > 0] + [("c", "c")]:
        lam_s, lam_t = (LAM[s], LAM[t]) if s != "c" else (3.7, -1.2)  # continuous levels too
        x0, x_s, x_t = (jnp.asarray(rng.normal(0, 1.5, (50, 4)), jnp.float32) for _ in range(3))
        pm, pv, plv = diffusion.q_posterior(x0, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
        np.testing.assert_allclose(np.log(np.float64(pv)), plv, rtol=1e-5, atol=1e-5)
        tm, tv = diffusion.q_xt_given_xs(x_s, log_snr_s=lam_s, log_snr_t=lam_t)
        ms, vs = diffusion.q_xt_given_x0(x0, lam_s)
        mt, vt = diffusion.q_xt_given_x0(x0, lam_t)
        lhs = log_normal(x_s, pm, pv) + log_normal(x_t, mt, vt)
        rhs = log_normal(x_t, tm, tv) + log_normal(x_s, ms, vs)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-3, err_msg=f"s={s} t={t}")


def test_posterior_sampled_moments():
    """x_t ~ q(x_t | x_0) then x_s ~ q(x_s | x_t, x_0) gives x_s ~ q(x_s | x_0) with
    Cov(x_s, x_t) = alpha_{t|s} sigma_s^2."""
    N = 40_000
    x0 = jnp.tile(jnp.array([[-1.0, 0.3, 1.5]]), (N, 1))
    rng = np.random.default_rng(1)

    @jax.jit
    def draw(lam_s, lam_t, e1, e2):
        x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam_t, e1)
        mean, var, _ = diffusion.q_posterior(x0, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
        return x_t, mean + jnp.sqrt(var) * e2

    for s, t in [p for p in PAIRS if p[0] > 0]:
        e1, e2 = (jnp.asarray(rng.standard_normal((N, 3)), jnp.float32) for _ in range(2))
        x_t, x_s = (np.float64(a) for a in draw(SCHED.log_snr[s], SCHED.log_snr[t], e1, e2))
        a_s, v_s = np.sqrt(sig(LAM[s])), sig(-LAM[s])
        np.testing.assert_allclose(x_s.mean(0), a_s * np.float64(x0[0]), atol=5 * np.sqrt(v_s / N))
        np.testing.assert_allclose(x_s.var(0), v_s, rtol=5 * np.sqrt(2 / N))
        cov = ((x_s - x_s.mean(0)) * (x_t - x_t.mean(0))).mean(0)
        v_t = sig(-LAM[t])
        np.testing.assert_allclose(cov, np.sqrt(sig(LAM[t]) / sig(LAM[s])) * v_s,
                                   atol=5 * np.sqrt(v_s * v_t / N))


def test_posterior_equals_the_schedule_tables():
    """Ho et al. eqs. 6-7 from the tables = the log-SNR form, for t = 1..T."""
    rng = np.random.default_rng(2)
    t = np.arange(1, 21)
    x0, x_t = (jnp.asarray(rng.normal(size=(20, 2)), jnp.float32) for _ in range(2))
    mean, var, _ = diffusion.q_posterior(x0, x_t, log_snr_s=SCHED.log_snr[t - 1], log_snr_t=SCHED.log_snr[t])
    c0, ct = SCHED.posterior_mean_coef_x0[t][:, None], SCHED.posterior_mean_coef_xt[t][:, None]
    np.testing.assert_allclose(mean, c0 * x0 + ct * x_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0], SCHED.posterior_variance[t], rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(mean[0], x0[0])  # t = 1: the point mass at x_0
    assert np.all(np.asarray(var[0]) == 0)


# ---------------------------------------------------------------------------
# Parameterizations and the reverse step.
# ---------------------------------------------------------------------------


def test_parameterization_round_trips_are_identities():
    rng = np.random.default_rng(3)
    lam = jnp.linspace(-6.0, 6.0, 9)
    x0, eps, other = (jnp.asarray(rng.standard_normal((9, 5)), jnp.float32) for _ in range(3))
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam, eps)

    @jax.jit
    def all_round_trips():
        res = {}
        for a in diffusion.PARAMETERIZATIONS:
            out = diffusion.output_from_x0_eps(x0, eps, x_t, lam, a)
            res[a, "x0_eps"] = jnp.stack(diffusion.x0_eps_from_output(out, x_t, lam, a))
            for b in diffusion.PARAMETERIZATIONS:
                res[a, b] = diffusion.convert(diffusion.convert(other, x_t, lam, a, b), x_t, lam, b, a)
        return res

    for (a, b), got in all_round_trips().items():
        want = jnp.stack([x0, eps]) if b == "x0_eps" else other
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{a} -> {b}")


def test_p_mean_variance_for_every_variance_type():
    rng = np.random.default_rng(4)
    t = jnp.arange(1, 21)
    lam_s, lam_t = SCHED.log_snr[t - 1], SCHED.log_snr[t]
    x_t, pred = (jnp.asarray(rng.standard_normal((20, 3)), jnp.float32) for _ in range(2))
    lam_next = SCHED.log_snr[jnp.minimum(t + 1, 20)]
    log_small, log_large = diffusion.reverse_log_variance_bounds(log_snr_s=lam_s, log_snr_t=lam_t, log_snr_next=lam_next)
    np.testing.assert_allclose(log_large, np.log(np.float64(SCHED.betas[1:])), rtol=1e-5, atol=1e-6)
    # improved-diffusion's posterior_log_variance_clipped: log beta~_2 at t = 1.
    np.testing.assert_allclose(log_small, np.log(np.float64(SCHED.posterior_variance)[[2] + list(range(2, 21))]),
                               rtol=1e-5)
    # fixed_large: beta~_2 at t = 1, beta_t after (np.append(posterior_variance[1], betas[1:])).
    log_fixed_large = np.concatenate([log_small[:1], log_large[1:]])
    x0_hat, _ = diffusion.x0_eps_from_output(pred, x_t, lam_t, "eps")
    post_mean, _, _ = diffusion.q_posterior(x0_hat, x_t, log_snr_s=lam_s, log_snr_t=lam_t)
    want = {"fixed_small": log_small, "fixed_large": log_fixed_large}
    for vt, v in [("fixed_small", None), ("fixed_large", None), ("learned_range", -1.0),
                  ("learned_range", 1.0), ("learned_range", 0.0), ("learned", -3.0)]:
        out = pred if v is None else jnp.concatenate([pred, jnp.full_like(pred, v)], -1)
        mean, log_var, x0_out = diffusion.p_mean_variance(out, x_t, "eps", vt, log_snr_s=lam_s, log_snr_t=lam_t,
                                                          log_snr_next=lam_next)
        np.testing.assert_allclose(mean, post_mean, rtol=1e-6)
        np.testing.assert_allclose(x0_out, x0_hat, rtol=1e-6)
        ref = {None: want.get(vt), -1.0: log_small, 1.0: log_large,
               0.0: 0.5 * (log_small + log_large)}.get(v, -3.0) if vt != "learned" else -3.0
        np.testing.assert_allclose(log_var, jnp.broadcast_to(jnp.asarray(ref)[..., None] if
                                                              jnp.ndim(ref) else ref, x_t.shape),
                                   rtol=1e-6, err_msg=f"{vt} {v}")
    _, _, clipped = diffusion.p_mean_variance(pred * 100, x_t, "eps", "fixed_small", log_snr_s=lam_s, log_snr_t=lam_t,
                                              clip_x0=(-1.0, 1.0))
    assert float(jnp.max(jnp.abs(clipped))) <= 1.0


# ---------------------------------------------------------------------------
# Transformations: jit without retracing, vmap, grad.
# ---------------------------------------------------------------------------


def test_jit_vmap_grad_compatible_and_traced_levels_do_not_retrace():
    traces = []

    @jax.jit
    def post(x0, x_t, lam_s, lam_t):
        traces.append(1)
        return diffusion.q_posterior(x0, x_t, log_snr_s=lam_s, log_snr_t=lam_t)[0]

    x = jnp.ones((4, 3))
    for s, t in PAIRS:
        out = post(x, x, SCHED.log_snr[s], SCHED.log_snr[t])
        assert np.all(np.isfinite(out))
    assert len(traces) == 1
    # vmap over a leading axis of levels and data.
    lams = jnp.linspace(-3.0, 3.0, 5)
    mean = jax.vmap(lambda l: diffusion.q_xt_given_x0(x, l)[0])(lams)
    np.testing.assert_allclose(mean[:, 0, 0], np.sqrt(sig(np.float64(lams))), rtol=1e-6)
    # grad: d x_t / d x_0 = alpha_t; the posterior mean is differentiable at s = 0 (lambda_s = inf).
    g = jax.grad(lambda x0: diffusion.sample_q_xt_given_x0(None, x0, 1.0, x)[0].sum())(x)
    np.testing.assert_allclose(g, np.sqrt(sig(1.0)), rtol=1e-6)
    g0, gt = jax.grad(lambda a, b: post(a, b, SCHED.log_snr[0], SCHED.log_snr[1]).sum(), (0, 1))(x, x)
    np.testing.assert_allclose(g0, 1.0)
    np.testing.assert_allclose(gt, 0.0)


def test_bad_arguments_raise_value_error_naming_them():
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"parameterization must be one of \('eps', 'x0', 'v', 'score', 'flow', 'edm'\)"):
        diffusion.x0_eps_from_output(x, x, 0.0, "mean")
    with pytest.raises(ValueError, match=r"variance type must be one of \('fixed_small'"):
        diffusion.p_mean_variance(x, x, "eps", "small", log_snr_s=1.0, log_snr_t=0.0)
    with pytest.raises(ValueError, match="same shape"):
        diffusion.sample_q_xt_given_x0(None, x, 0.0, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="same shape"):
        diffusion.q_posterior(x, jnp.zeros((3, 3)), log_snr_s=1.0, log_snr_t=0.0)
    with pytest.raises(ValueError, match="level array"):
        diffusion.q_xt_given_x0(x, jnp.zeros(5))
    with pytest.raises(ValueError, match="twice the data channels"):
        diffusion.split_variance_output(x, "learned_range")


def _two_level_functions():
    """Every public function of the math modules that takes two log-SNR levels."""
    import inspect
    from vdm import exact, losses, samplers
    found = []
    for module in (diffusion, losses, samplers, exact):
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__.startswith(module.__name__):
                params = inspect.signature(fn).parameters
                if "log_snr_s" in params and "log_snr_t" in params:
                    found.append((f"{fn.__module__}.{name}", fn))
    return found


def test_two_level_functions_take_the_levels_by_keyword_only():
    """(s, t) in one module and (t, s) in another cannot be mixed up: every function of two
    levels takes at least one of them by keyword only, so the pair cannot be passed (or
    swapped) by position."""
    import inspect
    functions = _two_level_functions()
    assert len(functions) >= 10, [n for n, _ in functions]
    for name, fn in functions:
        params = inspect.signature(fn).parameters
        positional = [level for level in ("log_snr_s", "log_snr_t")
                      if params[level].kind is not inspect.Parameter.KEYWORD_ONLY]
        assert len(positional) <= 1, f"{name} takes both levels by position"
    x = jnp.zeros((2, 3))
    lam_s, lam_t = jnp.asarray(2.0), jnp.asarray(0.0)
    with pytest.raises(TypeError):
        diffusion.q_posterior(x, x, lam_t, lam_s)  # the swapped positional call of (t, s) code
    mean, _, _ = diffusion.q_posterior(x, x + 1.0, log_snr_t=lam_t, log_snr_s=lam_s)  # any order by name
    np.testing.assert_allclose(mean, diffusion.q_posterior(x, x + 1.0, log_snr_s=lam_s, log_snr_t=lam_t)[0])
