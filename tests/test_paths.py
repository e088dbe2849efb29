"""Fast samplers and today's Gaussian paths: DPM-Solver++, the EDM sampler and preconditioning,
flow matching, zero terminal SNR. Closed forms, identities between samplers, measured orders of
convergence with the exact mixture denoiser, and the errors bad settings give."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import config as config_lib
from vdm import diffusion, exact, losses, samplers, schedules

MIX1 = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)  # seed 002
LINEAR = schedules.discrete_schedule("linear", 1000)
ZERO = schedules.discrete_schedule("linear", 1000, zero_terminal_snr=True)
COSINE = schedules.continuous_schedule("cosine")
FLOW = schedules.continuous_schedule("flow")
KEY = jax.random.PRNGKey(0)


def _model(param="eps", schedule=None, log_snr_fn=None, mix=MIX1):
    return exact.model_fn(mix, param, schedule=schedule, log_snr_fn=log_snr_fn)


def _stats_error(x, ref):
    return np.array([np.max(np.abs(a - b)) for a, b in zip(exact.component_stats(MIX1, x), ref)])


@pytest.fixture(scope="module")
def reference():
    return exact.component_stats(MIX1, exact.sample(jax.random.PRNGKey(1), MIX1, 200_000))


# ---------------------------------------------------------------------------
# Flow matching: the schedule and the velocity parameterization.
# ---------------------------------------------------------------------------


def test_flow_schedule_is_a_rescaled_rectified_flow():
    """x^flow = (1 - t) x0 + t eps equals flow_scale * (alpha x0 + sigma eps) at log-SNR 2 log((1-t)/t),
    and the flow time sigmoid(-lambda/2) is t; the ends are SNR +inf and 0."""
    t = jnp.linspace(0.01, 0.99, 9)
    rng = np.random.default_rng(0)
    x0, eps = (jnp.asarray(rng.standard_normal((9, 3)), jnp.float32) for _ in range(2))
    lam = FLOW(t)
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam, eps)
    np.testing.assert_allclose(diffusion.flow_scale(lam)[:, None] * x_t, (1 - t[:, None]) * x0 + t[:, None] * eps,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.nn.sigmoid(-0.5 * lam), t, rtol=1e-5)
    assert float(FLOW(0.0)) == np.inf and float(FLOW(1.0)) == -np.inf
    t_back = schedules.invert_log_snr(FLOW, lam)
    np.testing.assert_allclose(t_back, t, atol=1e-6)


LEVELS = jnp.asarray([-jnp.inf, -15.0, -6.0, -1.0, 0.0, 2.0, 7.0, 15.0], jnp.float32)


@pytest.mark.parametrize("source", ["flow", "edm"])
def test_flow_and_edm_round_trips_with_every_parameterization_are_exact(source):
    """source -> target -> source is the identity, and the velocity is eps - x0 exactly; at every level
    SNR 0 (lambda = -inf) included for v, flow and edm; through x0 up to lambda = 7 and through eps and
    score for |lambda| <= 7 (beyond, float32 cancels in eps = (x_t - alpha x0) / sigma or
    x0 = (x_t - sigma eps) / alpha)."""
    rng = np.random.default_rng(1)
    x0, eps, other = (jnp.asarray(rng.standard_normal((8, 4)), jnp.float32) for _ in range(3))
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, LEVELS, eps)
    u = diffusion.output_from_x0_eps(x0, eps, x_t, LEVELS, "flow")
    np.testing.assert_allclose(u, eps - x0, atol=1e-6)
    for target in diffusion.PARAMETERIZATIONS:
        rows = {"x0": slice(0, 7), "eps": slice(2, 7), "score": slice(2, 7)}.get(target, slice(None))
        back = diffusion.convert(diffusion.convert(other, x_t, LEVELS, source, target), x_t, LEVELS, target, source)
        np.testing.assert_allclose(back[rows], other[rows], rtol=1e-4, atol=1e-4, err_msg=target)
        got = diffusion.x0_eps_from_output(diffusion.output_from_x0_eps(x0, eps, x_t, LEVELS, source),
                                           x_t, LEVELS, source)
        np.testing.assert_allclose(jnp.stack(got), jnp.stack([x0, eps]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# EDM preconditioning.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_network_input_and_target_have_unit_variance_at_every_sigma(sigma_data):
    """Data of standard deviation sigma_data (a bimodal mixture, so not Gaussian): the network input
    c_in y and the training target F have variance 1 at every level (Karras et al. 2022, App. B.6)."""
    n = 200_000
    mix = exact.gaussian_mixture([0.5, 0.5], [-0.8 * sigma_data, 0.8 * sigma_data], 0.36 * sigma_data ** 2)
    x0 = exact.sample(jax.random.PRNGKey(3), mix, n)
    eps = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    for lam in [-jnp.inf, -12.0, -4.0, -1.0, 0.0, 1.0, 4.0, 12.0]:
        x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam, eps)
        net_in = x_t * diffusion.network_input_scale(lam, "edm", sigma_data)
        target = diffusion.output_from_x0_eps(x0, eps, x_t, lam, "edm", sigma_data)
        tol = 5 * np.sqrt(2.0 / n) * 1.5
        assert abs(float(jnp.var(net_in)) - 1.0) < tol, (lam, float(jnp.var(net_in)))
        assert abs(float(jnp.var(target)) - 1.0) < tol, (lam, float(jnp.var(target)))


def test_edm_parameterization_is_karras_table_1():
    """x0_hat = D(y; sigma) = c_skip y + c_out F on y = x_t / alpha (with c_in y = network input), the
    EDM loss lambda(sigma) ||D - x0||^2 with lambda = 1 / c_out^2 is the unit-weight MSE in F, and
    sigma_data = 1 makes F = -v."""
    rng = np.random.default_rng(5)
    lam = jnp.asarray(np.linspace(-8, 8, 7), jnp.float32)
    x_t, f, x0 = (jnp.asarray(rng.standard_normal((7, 3)), jnp.float32) for _ in range(3))
    for sd in (0.5, 1.0, 2.0):
        c_skip, c_out, c_in, c_noise = (c[:, None] for c in diffusion.edm_preconditioning(lam, sd))
        alpha, _ = diffusion.alpha_sigma(lam[:, None])
        x0_hat, _ = diffusion.x0_eps_from_output(f, x_t, lam, "edm", sd)
        np.testing.assert_allclose(x0_hat, c_skip * x_t / alpha + c_out * f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c_in / alpha, diffusion.network_input_scale(lam, "edm", sd)[:, None], rtol=1e-5)
        np.testing.assert_allclose(c_noise[:, 0], np.log(np.exp(-0.5 * np.float64(lam))) / 4, rtol=1e-5, atol=1e-6)
        _, eps = diffusion.x0_eps_from_output(x0, x_t, lam, "x0")
        mse_f = losses.simple_loss(f, x0, eps, x_t, lam, "edm", sigma_data=sd)
        edm = jnp.mean((x0_hat - x0) ** 2, axis=1) / c_out[:, 0] ** 2
        np.testing.assert_allclose(mse_f, edm, rtol=1e-4)
        np.testing.assert_allclose(losses.simple_loss(f, x0, eps, x_t, lam, "edm", target="x0", weighting="snr",
                                                      sigma_data=sd), jnp.mean((x0_hat - x0) ** 2, axis=1) *
                                   jnp.exp(lam), rtol=1e-4)
    np.testing.assert_allclose(diffusion.convert(f, x_t, lam, "edm", "v", 1.0), -f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["flow", "edm"])
def test_snr_weighting_in_flow_and_edm_space_is_the_x0_error(target):
    """simple_loss's weightings convert a flow / edm error to the x0 error: weighting 'snr' in that
    space is SNR * ||x0_hat - x0||^2 whatever the network's parameterization."""
    rng = np.random.default_rng(7)
    lam = jnp.asarray(np.linspace(-6, 6, 5), jnp.float32)
    x0, eps, out = (jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3))
    x_t, _ = diffusion.sample_q_xt_given_x0(None, x0, lam, eps)
    for param in ("eps", "v", target):
        x0_hat, _ = diffusion.x0_eps_from_output(out, x_t, lam, param)
        got = losses.simple_loss(out, x0, eps, x_t, lam, param, target=target, weighting="snr")
        np.testing.assert_allclose(got, jnp.exp(lam) * jnp.mean((x0_hat - x0) ** 2, axis=1), rtol=2e-4)


# ---------------------------------------------------------------------------
# Training times and the continuous simple loss.
# ---------------------------------------------------------------------------


def test_training_time_distributions():
    """logit-normal t on the flow schedule and log-normal sigma are normal in log-SNR with mean
    -2 loc and std 2 scale; uniform t stays inside [T_CLIP, 1 - T_CLIP]."""
    n = 100_000
    u = jax.random.uniform(KEY, (n,))
    for kind, fn, loc, scale in [("logit_normal", FLOW, 0.5, 1.0), ("log_normal", COSINE, -1.2, 1.2)]:
        lam = fn(losses.sample_times(None, fn, n, kind, loc, scale, u=u))
        se = 2 * scale / np.sqrt(n)
        assert abs(float(jnp.mean(lam)) + 2 * loc) < 5 * se, kind
        assert abs(float(jnp.std(lam)) - 2 * scale) < 5 * se * 1.5, kind
    t = losses.sample_times(KEY, FLOW, n)
    assert float(t.min()) >= losses.T_CLIP and float(t.max()) <= 1 - losses.T_CLIP
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        losses.sample_times(KEY, FLOW, 4, "beta")


@pytest.mark.parametrize("param, kind", [("flow", "logit_normal"), ("edm", "log_normal"), ("eps", "uniform")])
def test_exact_denoiser_minimises_the_continuous_simple_loss(param, kind):
    """E||out + c - target||^2 - E||out - target||^2 = c^2 for the exact conditional mean (the tower
    property: E[out - target] = 0), with common random numbers; the loss is finite everywhere."""
    fn = COSINE if param != "flow" else FLOW
    model = _model(param, log_snr_fn=fn)
    x0 = exact.sample(jax.random.PRNGKey(6), MIX1, 100_000)
    c = 0.3
    base, aux = losses.continuous_simple_loss(model, fn, KEY, x0, parameterization=param, t_sampling=kind)
    moved, _ = losses.continuous_simple_loss(lambda x, t: model(x, t) + c, fn, KEY, x0, parameterization=param,
                                             t_sampling=kind)
    assert np.all(np.isfinite(base)) and aux["t"].shape == (100_000,)
    diff = moved - base
    assert abs(float(jnp.mean(diff)) - c ** 2) < 5 * float(jnp.std(diff)) / np.sqrt(100_000)


# ---------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2024) and its off-by-one errors.
# ---------------------------------------------------------------------------


def test_zero_terminal_snr_rescale():
    """sqrt(alpha_bar) is an affine map of the original over t = 1..T with alpha_bar_T = 0 and alpha_bar_1
    unchanged: the paper's first array entry is t = 1 here, not the data level (index 0 keeps
    alpha_bar_0 = 1, log-SNR +inf; rescaling with index 0 as 'first' would change alpha_bar_1)."""
    old = np.sqrt(np.float64(LINEAR.alpha_bars))
    new = np.sqrt(np.float64(ZERO.alpha_bars))
    assert new[0] == 1.0 and float(ZERO.log_snr[0]) == np.inf
    assert new[-1] == 0.0 and float(ZERO.log_snr[-1]) == -np.inf and float(ZERO.betas[-1]) == 1.0
    np.testing.assert_allclose(new[1], old[1], rtol=1e-6)
    slope, intercept = np.polyfit(old[1:], new[1:], 1)
    np.testing.assert_allclose(new[1:], slope * old[1:] + intercept, atol=2e-6)
    assert np.all(np.isfinite(np.asarray(ZERO.log_snr[1:-1]))) and np.all(np.diff(np.asarray(ZERO.log_snr)) < 0)
    # The posterior into T - 1 from x_T (which holds no signal): mean alpha_{T-1} x0, variance sigma_{T-1}^2.
    np.testing.assert_allclose(ZERO.posterior_mean_coef_xt[-1], 0.0)
    np.testing.assert_allclose(ZERO.posterior_variance[-1], 1.0 - ZERO.alpha_bars[-2], rtol=1e-5)
    x0, x_t = jnp.ones((1, 2)), jnp.full((1, 2), 7.0)
    mean, var, _ = diffusion.q_posterior(x0, x_t, log_snr_s=ZERO.log_snr[-2], log_snr_t=ZERO.log_snr[-1])
    np.testing.assert_allclose(mean, np.sqrt(ZERO.alpha_bars[-2]) * x0, rtol=1e-5)
    np.testing.assert_allclose(var, 1.0 - ZERO.alpha_bars[-2], rtol=1e-5)
    with pytest.raises(ValueError, match="zero_terminal_snr must be True or False"):
        schedules.discrete_schedule("linear", 1000, zero_terminal_snr="yes")


def test_trailing_spacing_starts_at_T_and_ends_on_the_data_level():
    """Lin et al. 2024 §3.4 / Table 2: 'leading' spacing never visits t = T (SNR 0); 'trailing' does,
    and every grid's last step goes to alpha_bar = 1 (the data level, time 0), not to t = 1."""
    trailing = samplers.time_grid(10, schedule=ZERO, spacing="trailing")
    leading = samplers.time_grid(10, schedule=ZERO, spacing="leading")
    np.testing.assert_array_equal(trailing.times, [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    assert trailing.log_snr[0] == -np.inf and np.isfinite(leading.log_snr[0]) and leading.times[0] == 901
    for grid in (trailing, leading):
        assert grid.times[-1] == 0 and grid.log_snr[-1] == np.inf


@pytest.mark.parametrize("sampler, opts", [("ancestral", {}), ("ddim", {}), ("ddim", {"eta": 1.0}),
                                           ("dpm_solver", {}), ("flow", {"method": "heun"})])
def test_first_step_at_snr_zero_is_well_defined(reference, sampler, opts):
    """From x_T at SNR 0 with v prediction: x0_hat of the first step is E[x0] (the mixture mean) for
    every x_T, and the samples match the mixture."""
    model = _model("v", schedule=ZERO)
    x, traj = samplers.sample(model, KEY, (8000, 1), sampler=sampler, schedule=ZERO, num_steps=50,
                              spacing="trailing", parameterization="v", trajectory_every=1, **opts)
    np.testing.assert_allclose(traj.x0[0], jnp.sum(MIX1.weights * MIX1.means[:, 0]), atol=1e-4)
    assert np.all(np.isfinite(x))
    err = _stats_error(x, reference)
    assert np.all(err < [0.03, 0.12, 0.2]), err


def test_zero_snr_start_errors_name_the_fix():
    with pytest.raises(ValueError, match="SNR 0.*'v', 'x0', 'flow' or 'edm'"):
        samplers.sample(_model("eps", schedule=ZERO), KEY, (4, 1), schedule=ZERO, num_steps=10,
                        spacing="trailing")
    for sampler in ("langevin", "pc", "ode", "edm"):
        with pytest.raises(ValueError, match=f"sampler '{sampler}' works in y = x_t / alpha_t"):
            samplers.sample(_model("flow", log_snr_fn=FLOW), KEY, (4, 1), sampler=sampler, log_snr_fn=FLOW,
                            num_steps=10, parameterization="flow")


# ---------------------------------------------------------------------------
# DPM-Solver++, the EDM sampler, flow Euler/Heun: identities and orders.
# ---------------------------------------------------------------------------


def test_dpm_solver_order_schedule():
    """Warm-up from the first order, lower orders at the end below 10 steps, the final step first order."""
    np.testing.assert_array_equal(samplers.dpm_solver_orders(5, 2), [1, 2, 2, 2, 1])
    np.testing.assert_array_equal(samplers.dpm_solver_orders(6, 3), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(samplers.dpm_solver_orders(12, 3), [1, 2] + [3] * 9 + [1])
    np.testing.assert_array_equal(samplers.dpm_solver_orders(1, 3), [1])


def test_first_order_solvers_are_ddim():
    """DPM-Solver++ of order 1 and flow Euler are both DDIM (eta = 0), on a discrete and a continuous grid."""
    for levels, kw in [(dict(schedule=LINEAR), {}), (dict(log_snr_fn=COSINE), dict(spacing="karras"))]:
        model = _model("eps", **levels)
        run = lambda **o: samplers.sample(model, KEY, (256, 1), num_steps=12, **levels, **kw, **o)
        ddim = run(sampler="ddim")
        np.testing.assert_allclose(run(sampler="dpm_solver", order=1), ddim, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run(sampler="flow", method="euler"), ddim, rtol=1e-4, atol=1e-4)


def test_edm_without_churn_is_the_heun_ode_sampler():
    for levels in (dict(schedule=LINEAR), dict(log_snr_fn=COSINE)):
        model = _model("eps", **levels)
        run = lambda s, **o: samplers.sample(model, KEY, (256, 1), sampler=s, num_steps=12, spacing="karras",
                                             **levels, **o)
        np.testing.assert_allclose(run("edm"), run("ode", method="heun"), rtol=1e-5, atol=1e-5)


def test_edm_churn_rounds_to_model_levels_and_matches_the_mixture(reference):
    """S_churn > 0 raises the level to the nearest table entry of a discrete model; samples match."""
    time_of = samplers.nearest_level_fn(("discrete", tuple(np.asarray(LINEAR.log_snr).tolist())))
    for w, want in ((0.7, 500), (0.3, 501)):
        t, lam = time_of(w * LINEAR.log_snr[500] + (1 - w) * LINEAR.log_snr[501])
        assert int(t) == want and float(lam) == float(LINEAR.log_snr[want])
    for levels in (dict(schedule=LINEAR), dict(log_snr_fn=COSINE)):
        x = samplers.sample(_model("eps", **levels), KEY, (8000, 1), sampler="edm", num_steps=40,
                            spacing="karras", S_churn=20.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003, **levels)
        err = _stats_error(x, reference)
        assert np.all(err < [0.03, 0.12, 0.2]), err


def _path_errors(sampler, steps, opts, ref_x):
    model = _model("eps", log_snr_fn=COSINE)
    return [float(jnp.sqrt(jnp.mean((samplers.sample(model, KEY, (500, 1), sampler=sampler, log_snr_fn=COSINE,
                                                     num_steps=n, spacing="karras", **opts) - ref_x) ** 2)))
            for n in steps]


def test_measured_orders_of_convergence():
    """Deterministic samplers against a 1000-step 3M solution from the same x_T (Karras grid, cosine
    schedule): the fitted slope of log RMS error vs log steps is about -1 for DDIM and about -2 for
    DPM-Solver++(2M); 2M at 20 steps beats DDIM at 100 (scripts/sampler_accuracy.py measures all)."""
    ref_x = samplers.sample(_model("eps", log_snr_fn=COSINE), KEY, (500, 1), sampler="dpm_solver", order=3,
                            log_snr_fn=COSINE, num_steps=1000, spacing="karras")
    steps = (20, 40, 80)
    slope = lambda e: np.polyfit(np.log(steps), np.log(e), 1)[0]
    ddim = _path_errors("ddim", steps, {}, ref_x)
    dpm2 = _path_errors("dpm_solver", steps, {}, ref_x)
    assert -1.3 < slope(ddim) < -0.7, ddim
    assert slope(dpm2) < -1.7, dpm2
    assert dpm2[0] < _path_errors("ddim", (100,), {}, ref_x)[0]


def test_flow_matching_sampler_on_the_flow_schedule(reference):
    """Heun on the uniform t-grid of the flow schedule, from x_T at SNR 0, with the velocity model."""
    x = samplers.sample(_model("flow", log_snr_fn=FLOW), KEY, (8000, 1), sampler="flow", method="heun",
                        log_snr_fn=FLOW, num_steps=30, parameterization="flow")
    err = _stats_error(x, reference)
    assert np.all(err < [0.03, 0.12, 0.2]), err


@pytest.mark.parametrize("sampler, opts, calls", [
    ("ancestral", {}, lambda n: n), ("ddim", {}, lambda n: n), ("dpm_solver", dict(order=3), lambda n: n),
    ("flow", {}, lambda n: n), ("flow", dict(method="heun"), lambda n: 2 * n - 1),
    ("ode", dict(method="heun"), lambda n: 2 * n - 1), ("edm", dict(S_churn=5.0), lambda n: 2 * n - 1),
    ("pc", dict(corrector_steps=2), lambda n: 3 * n)])
def test_network_evaluations_per_sampler(sampler, opts, calls):
    """The NFE the error-vs-NFE table assumes (and ``num_evaluations`` reports), counted at run time
    (a host callback per model call)."""
    assert samplers.num_evaluations(sampler, 7, opts) == calls(7)
    count = [0]
    model = _model("eps", schedule=LINEAR)

    def counted(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return model(x, t)
    x = samplers.sample(counted, KEY, (4, 1), sampler=sampler, schedule=LINEAR, num_steps=7, **opts)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert count[0] == calls(7), count[0]


BAD = [
    (dict(sampler="dpm_solver", order=4), r"order \(of DPM-Solver\+\+\) must be one of \(1, 2, 3\)"),
    (dict(sampler="dpm_solver", order=True), "order"),
    (dict(sampler="edm", S_churn=-1.0), "S_churn must be >= 0"),
    (dict(sampler="edm", S_tmin=2.0, S_tmax=1.0), "S_tmin <= S_tmax"),
    (dict(sampler="edm", S_noise=0.0), "S_noise must be > 0"),
    (dict(sampler="flow", method="rk4"), "method must be one of"),
    (dict(sampler="edm", eta=0.5), "unknown option"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_sampler_settings_raise_before_tracing(kwargs, match):
    count = [0]

    def model(x, t):
        count[0] += 1
        return x
    with pytest.raises(ValueError, match=match):
        samplers.sample(model, KEY, (4, 1), schedule=LINEAR, num_steps=10, **kwargs)
    assert count[0] == 0


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------


def _flow_config():
    c = config_lib.defaults()
    c.diffusion.update(dict(time="continuous", schedule="flow", T=0, parameterization="flow"))
    c.loss.update(dict(name="simple", t_sampling="logit_normal"))
    c.sample.update(dict(sampler="flow", num_steps=20, options={"method": "heun"}))
    return c


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(), None, None),
    ({"sample.options.order": 2}, "config.sample.options", "unknown option"),
    ({"sample.sampler": "dpm_solver", "sample.options": {"order": 5}}, "config.sample.options", "(1, 2, 3)"),
    ({"sample.sampler": "edm", "sample.options": {"S_churn": -1.0}}, "config.sample.options", "S_churn"),
    ({"diffusion.parameterization": "eps"}, "config.diffusion.parameterization", "'v', 'x0', 'flow', 'edm'"),
    ({"sample.sampler": "langevin", "sample.options": {}}, "config.sample.sampler", "spacing='karras'"),
    ({"loss.name": "vdm"}, "config.loss.name", "simple"),
    ({"loss.t_sampling": "beta"}, "config.loss.t_sampling", "logit_normal"),
    ({"loss.t_scale": 0.0}, "config.loss.t_scale", "(0.0"),
    ({"diffusion.sigma_data": -1.0}, "config.diffusion.sigma_data", "(0.0"),
])
def test_config_validation_of_paths_and_sampler_options(changes, field, allowed):
    c = _flow_config()
    for name, value in changes.items():
        section, *rest = name.split(".")
        target = c[section]
        for part in rest[:-1]:
            target = target[part]
        target[rest[-1]] = value
    if field is None:
        config_lib.validate(c)
        return
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert field in str(e.value) and allowed in str(e.value), str(e.value)


def test_zero_terminal_snr_config_needs_v_prediction():
    c = config_lib.defaults()
    c.diffusion.update(dict(schedule="linear", schedule_kwargs={"zero_terminal_snr": True}))
    c.sample.spacing = "trailing"
    with pytest.raises(ValueError, match="config.diffusion.parameterization"):
        config_lib.validate(c)
    c.diffusion.parameterization = "v"
    config_lib.validate(c)
