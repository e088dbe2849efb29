"""Samplers against the exact Gaussian-mixture denoiser (a perfect model): sample moments, identities
between samplers, encode/decode, compile and memory behaviour, keys and devices, argument errors."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import xla_flags
from vdm import diffusion, exact, samplers, schedules

MIX1 = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)  # seed 002
MIX2 = exact.gaussian_mixture([0.3, 0.7], [[-3.0, -1.0], [2.0, 2.0]], [[0.5, 1.0], [1.0, 0.25]])
MIXTURES = {"1d": MIX1, "2d": MIX2}
SCHEDULE = schedules.discrete_schedule("linear", 1000)  # prior N(0, I) exact to 1e-2 (seed 002's is not)
COSINE = schedules.continuous_schedule("cosine")
VP_LINEAR = schedules.continuous_schedule("vp_linear")
KEY = jax.random.PRNGKey(0)


def _model(mix, parameterization="eps", variance_type="fixed_small", schedule=SCHEDULE, log_snr_fn=None):
    if log_snr_fn is not None:
        schedule = None
    return exact.model_fn(mix, parameterization, schedule=schedule, log_snr_fn=log_snr_fn,
                          variance_type=variance_type)


@pytest.fixture(scope="module")
def references():
    """Component weights / means / variances of 400k exact samples, per mixture."""
    out = {}
    for name, mix in MIXTURES.items():
        x = jax.jit(lambda k, mix=mix: exact.sample(k, mix, 400_000))(jax.random.PRNGKey(1))
        out[name] = exact.component_stats(mix, x)
    return out


def _errors(mix, x, ref):
    stats = exact.component_stats(mix, x)
    return np.array([np.max(np.abs(a - b)) for a, b in zip(stats, ref)])


# ---------------------------------------------------------------------------
# Must show: samples match the mixture, with tolerances that shrink as steps grow.
# (id, mixture, number of samples, sample() kwargs, the kwarg the step count goes to,
#  ((steps, (weight, mean, variance) tolerances), ...)). Tolerances at the larger step
# count are about 4 Monte-Carlo standard errors; the error table is in
# scripts/sampler_accuracy.py.
# ---------------------------------------------------------------------------

TIGHT_1D = (0.025, 0.08, 0.11)
TIGHT_2D = (0.03, 0.1, 0.16)
CASES = [
    ("ancestral_fixed_small", "1d", 8000, dict(), "num_steps", ((25, (0.04, 0.2, 0.3)), (1000, TIGHT_1D))),
    ("ancestral_fixed_large_respaced", "1d", 8000, dict(variance_type="fixed_large"), "num_steps",
     ((25, (0.04, 0.2, 0.15)), (250, TIGHT_1D))),
    ("ancestral_learned_full", "1d", 8000, dict(variance_type="learned"), "num_steps", ((1000, TIGHT_1D),)),
    ("ddim_eta0", "1d", 8000, dict(sampler="ddim"), "num_steps", ((10, (0.03, 0.5, 0.15)), (100, TIGHT_1D))),
    ("ddim_eta0.5", "1d", 8000, dict(sampler="ddim", eta=0.5), "num_steps", ((100, TIGHT_1D),)),
    ("pc", "1d", 8000, dict(sampler="pc"), "num_steps", ((25, (0.04, 0.15, 0.2)), (250, TIGHT_1D))),
    ("langevin", "1d", 8000, dict(sampler="langevin", num_steps=10, spacing="karras", sigma_min=0.1,
                                  step_size=0.005), "steps_per_level",
     ((10, (0.08, 0.08, 1.0)), (100, (0.04, 0.08, 0.12)))),
    ("ode_euler_uniform", "1d", 8000, dict(sampler="ode", method="euler", log_snr_fn=VP_LINEAR), "num_steps",
     ((25, (0.03, 0.25, 0.12)), (250, TIGHT_1D))),
    ("ode_heun_karras", "1d", 8000, dict(sampler="ode", log_snr_fn=COSINE, spacing="karras"), "num_steps",
     ((10, (0.04, 0.6, 0.4)), (50, TIGHT_1D))),
    ("continuous_ancestral", "1d", 8000, dict(log_snr_fn=COSINE), "num_steps",
     ((25, (0.04, 0.2, 0.3)), (250, TIGHT_1D))),
    ("ancestral_2d", "2d", 4000, dict(), "num_steps", ((1000, TIGHT_2D),)),
    # 2-D: its narrow dimensions put the optimal variance inside [beta~, beta]; for the
    # unit-variance 1-D modes it sits at beta and learned_range would equal fixed_large.
    ("ancestral_learned_range_respaced_2d", "2d", 4000, dict(variance_type="learned_range"), "num_steps",
     ((10, (0.06, 0.35, 0.25)), (100, TIGHT_2D))),
    ("ddim_2d", "2d", 4000, dict(sampler="ddim"), "num_steps", ((100, TIGHT_2D),)),
    ("pc_2d", "2d", 4000, dict(sampler="pc"), "num_steps", ((250, TIGHT_2D),)),
    ("ode_heun_karras_2d", "2d", 4000, dict(sampler="ode", log_snr_fn=COSINE, spacing="karras"), "num_steps",
     ((50, TIGHT_2D),)),
]


@pytest.mark.parametrize("name, mix, n, kwargs, arg, checks", CASES, ids=[c[0] for c in CASES])
def test_samples_match_the_mixture(references, name, mix, n, kwargs, arg, checks):
    model = _model(MIXTURES[mix], variance_type=kwargs.get("variance_type", "fixed_small"),
                   log_snr_fn=kwargs.get("log_snr_fn"))
    if "log_snr_fn" not in kwargs:
        kwargs = dict(kwargs, schedule=SCHEDULE)
    totals = []
    for steps, tol in checks:
        x = samplers.sample(model, KEY, (n, MIXTURES[mix].means.shape[1]), **{**kwargs, arg: steps})
        err = _errors(MIXTURES[mix], x, references[mix])
        assert np.all(err <= tol), f"{name}, {steps} steps: errors {err} (weight, mean, var) > {tol}"
        totals.append(err.sum())
    assert totals == sorted(totals, reverse=True), f"{name}: total error {totals} does not fall with steps"


# ---------------------------------------------------------------------------
# Every parameterization drives every step identically.
# ---------------------------------------------------------------------------


@jax.jit
def _steps_in_every_parameterization(x, noise):
    t, s = jnp.int32(400), jnp.int32(300)
    lt, ls = SCHEDULE.log_snr[t], SCHEDULE.log_snr[s]
    out = []
    for p in diffusion.PARAMETERIZATIONS:
        small = samplers.Denoiser(_model(MIX2, p), p)
        ranged = samplers.Denoiser(_model(MIX2, p, "learned_range"), p, "learned_range")
        out.append(jnp.stack([
            samplers.ancestral_step(small, x, t=t, log_snr_t=lt, log_snr_s=ls, noise=noise)[0],
            samplers.ancestral_step(ranged, x, t=t, log_snr_t=lt, log_snr_s=ls, noise=noise)[0],
            samplers.ddim_step(small, x, t=t, log_snr_t=lt, log_snr_s=ls, noise=noise, eta=0.5)[0],
            samplers.langevin_step(small, x, t, lt, 0.01, noise)[0],
            samplers.corrector_step(small, x, t, lt, 0.99, 0.16, noise)[0],
            samplers.ode_step(small, x, t=t, log_snr_t=lt, s=s, log_snr_s=ls, method="heun")[0],
        ]))
    return jnp.stack(out)


def test_every_parameterization_gives_the_same_steps():
    x = jax.random.normal(KEY, (64, 2))
    out = _steps_in_every_parameterization(x, jax.random.normal(jax.random.PRNGKey(1), (64, 2)))
    for p in range(1, 4):
        np.testing.assert_allclose(out[p], out[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Identities between samplers.
# ---------------------------------------------------------------------------


@jax.jit
def _ddim_vs_ancestral_every_step(x, noise):
    """Both steps t -> t-1 for every t = 1..T at once (vmapped over t)."""
    den = samplers.Denoiser(_model(MIX1))
    t = jnp.arange(1, SCHEDULE.T + 1)

    def both(t):
        lt, ls = SCHEDULE.log_snr[t], SCHEDULE.log_snr[t - 1]
        return (samplers.ddim_step(den, x, t=t, log_snr_t=lt, log_snr_s=ls, noise=noise, eta=1.0)[0],
                samplers.ancestral_step(den, x, t=t, log_snr_t=lt, log_snr_s=ls, noise=noise)[0])

    return jax.vmap(both)(t)


def test_ddim_eta1_is_the_fixed_small_ancestral_step_at_every_t():
    """DDIM eq. 12 with eta = 1 has the DDPM posterior mean and variance beta~ (fixed_small)."""
    x = 3.0 * jax.random.normal(KEY, (32, 1))
    ddim, ddpm = _ddim_vs_ancestral_every_step(x, jax.random.normal(jax.random.PRNGKey(1), (32, 1)))
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-5, atol=2e-5)


def test_ddim_eta1_is_the_ddpm_sampler_on_the_full_sequence():
    model = _model(MIX1)
    a = samplers.sample(model, KEY, (256, 1), schedule=SCHEDULE, sampler="ddim", eta=1.0)
    b = samplers.sample(model, KEY, (256, 1), schedule=SCHEDULE)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@jax.jit
def _deterministic_runs(x_T, keys_a, keys_b):
    den = samplers.Denoiser(_model(MIX1))
    grid = samplers.time_grid(50, schedule=SCHEDULE)
    return (samplers.ddim(den, x_T, keys_a, grid)[0], samplers.ddim(den, x_T, keys_b, grid)[0],
            samplers.probability_flow(den, x_T, None, grid, method="euler")[0],
            samplers.ddim(den, x_T, keys_a, grid, eta=0.3)[0], samplers.ddim(den, x_T, keys_b, grid, eta=0.3)[0])


def test_ddim_eta0_is_deterministic_and_is_euler_on_the_ode():
    x_T = jax.random.normal(KEY, (128, 1))
    keys_a, keys_b = jax.random.split(jax.random.PRNGKey(1), 128), jax.random.split(jax.random.PRNGKey(2), 128)
    d_a, d_b, euler, s_a, s_b = _deterministic_runs(x_T, keys_a, keys_b)
    np.testing.assert_array_equal(d_a, d_b)                       # no randomness beyond x_T
    np.testing.assert_allclose(euler, d_a, rtol=1e-4, atol=1e-4)   # DDIM eta=0 == Euler in x / alpha
    assert np.max(np.abs(s_a - s_b)) > 0.1                         # eta > 0 does use the keys


@pytest.fixture(scope="module")
def round_trips():
    """median |decode(encode(x0)) - x0| for DDIM eta=0 (discrete) and Heun (continuous), by step count.
    (The median: samples near the boundary between the modes are ill-conditioned for any solver.)"""
    x0 = jax.jit(lambda k: exact.sample(k, MIX1, 512))(jax.random.PRNGKey(3))
    out = {}
    for n in (10, 40, 160):
        @jax.jit
        def run(x0, n=n):
            den_d = samplers.Denoiser(_model(MIX1))
            den_c = samplers.Denoiser(_model(MIX1, log_snr_fn=VP_LINEAR))
            g_d = samplers.time_grid(n, schedule=SCHEDULE)
            g_c = samplers.time_grid(n, log_snr_fn=VP_LINEAR)
            x_T = samplers.encode(den_d, x0, g_d)
            y_T = samplers.encode(den_c, x0, g_c, method="heun")
            return (samplers.ddim(den_d, x_T, None, g_d)[0],
                    samplers.probability_flow(den_c, y_T, None, g_c, method="heun")[0], x_T)
        ddim, heun, x_T = run(x0)
        out[n] = (float(jnp.median(jnp.abs(ddim - x0))), float(jnp.median(jnp.abs(heun - x0))), x_T)
    return out


def test_encode_then_decode_returns_x0_with_error_falling_with_steps(round_trips):
    ddim = [round_trips[n][0] for n in (10, 40, 160)]
    heun = [round_trips[n][1] for n in (10, 40, 160)]
    assert ddim == sorted(ddim, reverse=True) and ddim[-1] < 0.05, ddim  # first order: ~1/steps
    assert heun == sorted(heun, reverse=True) and heun[-1] < 1e-4, heun   # second order
    assert all(h < d / 5 for h, d in zip(heun, ddim))
    x_T = round_trips[160][2]  # the encoding of data is (close to) the N(0, I) prior
    assert abs(float(jnp.mean(x_T))) < 0.15 and abs(float(jnp.std(x_T)) - 1) < 0.15


# ---------------------------------------------------------------------------
# Compiles once; memory does not grow with steps; trajectories.
# ---------------------------------------------------------------------------


def _counting(model):
    count = [0]

    def fn(x, t):
        count[0] += 1  # runs only while tracing
        return model(x, t)

    return fn, count


SAMPLER_CALLS = {
    "ancestral": lambda den, x, k, g: samplers.ancestral(den, x, k, g),
    "ddim": lambda den, x, k, g: samplers.ddim(den, x, k, g, eta=0.5),
    "langevin": lambda den, x, k, g: samplers.annealed_langevin(den, x, k, g, steps_per_level=7),
    "pc": lambda den, x, k, g: samplers.predictor_corrector(den, x, k, g, corrector_steps=3),
    "ode": lambda den, x, k, g: samplers.probability_flow(den, x, k, g, method="heun"),
    "encode": lambda den, x, k, g: (samplers.encode(den, x, g, method="heun"), None),
    "dpm_solver": lambda den, x, k, g: samplers.dpm_solver(den, x, k, g, order=3),
    "edm": lambda den, x, k, g: samplers.edm_sampler(den, x, k, g, S_churn=10.0, time_of=samplers.nearest_level_fn(
        ("discrete", tuple(np.asarray(SCHEDULE.log_snr).tolist())))),
    "flow": lambda den, x, k, g: samplers.flow_sampler(den, x, k, g, method="heun"),
}


@pytest.mark.parametrize("name", list(SAMPLER_CALLS))
def test_traces_do_not_grow_with_steps(name):
    """Lowering the driver for 10 and for 1000 steps traces the model the same few times."""
    fn, count = _counting(_model(MIX1))
    den = samplers.Denoiser(fn)
    x, keys = jnp.zeros((8, 1)), jax.random.split(KEY, 8)
    traces = []
    for n in (10, 1000):
        grid = samplers.time_grid(n, schedule=SCHEDULE)
        before = count[0]
        jax.jit(SAMPLER_CALLS[name], static_argnums=0).lower(den, x, keys, grid)
        traces.append(count[0] - before)
    assert traces[0] == traces[1] <= 3, traces


def test_sample_compiles_once_per_step_count_and_reuses_it():
    fn, count = _counting(_model(MIX1))
    a = samplers.sample(fn, KEY, (16, 1), schedule=SCHEDULE, num_steps=10)
    after_10 = count[0]
    samplers.sample(fn, KEY, (16, 1), schedule=SCHEDULE, num_steps=1000)
    after_1000 = count[0]
    b = samplers.sample(fn, KEY, (16, 1), schedule=SCHEDULE, num_steps=10)
    samplers.sample(fn, jax.random.PRNGKey(5), (16, 1), schedule=SCHEDULE, num_steps=10, spacing="trailing")
    assert after_10 == 1 and after_1000 == 2 and count[0] == 2  # new timesteps or key: no retrace
    np.testing.assert_array_equal(a, b)                          # same key, same samples
    c = samplers.sample(fn, jax.random.PRNGKey(5), (16, 1), schedule=SCHEDULE, num_steps=10)
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 0.1


def _memory(n, every):
    den = samplers.Denoiser(_model(MIX1))
    grid = samplers.time_grid(n, schedule=SCHEDULE)
    run = jax.jit(lambda x, k, g: samplers.ancestral(den, x, k, g, trajectory_every=every))
    return run.lower(jnp.zeros((1024, 1)), jax.random.split(KEY, 1024), grid).compile().memory_analysis()


def test_memory_does_not_grow_with_steps_without_a_trajectory():
    """Without a trajectory, 990 more steps add only the grid's per-step scalars (< 32 bytes a
    step), not a state (1024 x 4 bytes a step); with one, the kept states are outputs."""
    m10, m1000 = _memory(10, None), _memory(1000, None)
    assert m1000.temp_size_in_bytes - m10.temp_size_in_bytes < 32 * 990
    assert m1000.output_size_in_bytes == m10.output_size_in_bytes
    kept = _memory(1000, 1)  # the trajectory: 2 arrays of 1000 x 1024 float32
    assert kept.output_size_in_bytes >= m10.output_size_in_bytes + 2 * 1000 * 1024 * 4


def test_trajectory_every_k():
    model = _model(MIX1)
    plain = samplers.sample(model, KEY, (32, 1), schedule=SCHEDULE, num_steps=10)
    x, traj = samplers.sample(model, KEY, (32, 1), schedule=SCHEDULE, num_steps=10, trajectory_every=3)
    grid = samplers.time_grid(10, schedule=SCHEDULE)
    np.testing.assert_array_equal(traj.times, grid.times[[3, 6, 9, 10]])
    assert traj.x.shape == traj.x0.shape == (4, 32, 1)
    np.testing.assert_allclose(x, plain, atol=1e-4)     # the padded no-op steps change nothing
    np.testing.assert_array_equal(traj.x[-1], x)
    np.testing.assert_array_equal(traj.x0[-1], x)       # the last step lands on x0_hat
    assert np.all(np.diff(np.std(traj.x, axis=1)[:, 0]) > -0.05)  # x_t spreads out towards the modes


# ---------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------

PMAP_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from vdm import exact, samplers, schedules
    assert jax.local_device_count() == 4
    mix = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)
    sch = schedules.discrete_schedule("linear", 1000)
    model = exact.model_fn(mix, "v", schedule=sch)
    cond = exact.conditional_model_fn(mix, "eps", schedule=sch)
    key = jax.random.PRNGKey(7)
    labels = np.arange(16) % 3
    for kw in (dict(sampler="ancestral", num_steps=20, parameterization="v", trajectory_every=5),
               dict(sampler="pc", num_steps=20, parameterization="v")):
        one = samplers.sample(model, key, (16, 1), schedule=sch, **kw)
        four = samplers.pmap_sample(model, key, (16, 1), schedule=sch, **kw)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    kw = dict(num_steps=20, labels=labels, guidance_scale=1.5, null_label=2)
    one = samplers.sample(cond, key, (16, 1), schedule=sch, **kw)
    four = samplers.sample(cond, key, (16, 1), schedule=sch, pmap=True, **kw)
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-5)
    try:
        samplers.pmap_sample(model, key, (10, 1), schedule=sch, num_steps=5)
        raise SystemExit("no error for a batch the devices do not divide")
    except ValueError as e:
        assert "divisible" in str(e)
    print("OK")
""")


def test_pmap_on_four_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------


@jax.jit
def _guided_outputs(x, t, labels):
    lam = SCHEDULE.log_snr[t][:, None]
    out = {}
    for p in diffusion.PARAMETERIZATIONS:
        cond = exact.conditional_model_fn(MIX1, p, schedule=SCHEDULE)
        guided = samplers.classifier_free_guidance(cond, labels, 2.0, null_label=2)(x, t)
        e_c = diffusion.convert(cond(x, t, labels), x, lam, p, "eps")
        e_u = diffusion.convert(cond(x, t, jnp.full_like(labels, 2)), x, lam, p, "eps")
        out[p] = (diffusion.convert(guided, x, lam, p, "eps"), 3.0 * e_c - 2.0 * e_u)
    return out


def test_guidance_is_eps_space_guidance_in_every_parameterization():
    x = 3.0 * jax.random.normal(KEY, (16, 1))
    t = jnp.arange(10, 1000, 62)[:16].astype(jnp.int32)
    for p, (guided, by_hand) in _guided_outputs(x, t, jnp.arange(16) % 2).items():
        np.testing.assert_allclose(guided, by_hand, rtol=1e-4, atol=1e-4, err_msg=p)


def test_guided_sampling_draws_the_labelled_component():
    """w = 0 is the conditional model: label k gives N(mu_k, 1). Guidance w = 3 keeps every sample
    in its labelled mode and pushes it away from the other one (the guided score adds
    w (grad log q(x|k) - grad log q(x)))."""
    cond = exact.conditional_model_fn(MIX1, "eps", schedule=SCHEDULE)
    labels = jnp.arange(4000) % 2
    kw = dict(schedule=SCHEDULE, num_steps=100, sampler="ddim", labels=labels, null_label=2)
    plain = np.asarray(samplers.sample(cond, KEY, (4000, 1), guidance_scale=0.0, **kw))[:, 0]
    guided = np.asarray(samplers.sample(cond, KEY, (4000, 1), guidance_scale=3.0, **kw))[:, 0]
    for k, mu in ((0, -4.0), (1, 4.0)):
        xs = plain[np.asarray(labels) == k]
        assert abs(xs.mean() - mu) < 0.1 and abs(xs.var() - 1.0) < 0.15
        g = guided[np.asarray(labels) == k]
        assert np.all(np.sign(g) == np.sign(mu)) and np.sign(mu) * (g.mean() - xs.mean()) > 0.05


# ---------------------------------------------------------------------------
# Grids, x0 post-processing.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "quadratic"])
@pytest.mark.parametrize("n", [1, 7, 50, 250])
def test_timestep_spacing(spacing, n):
    if spacing == "quadratic" and n >= 50:  # floor(k^2 0.8 T / (n-1)^2) repeats small values
        with pytest.raises(ValueError, match="repeats timesteps"):
            samplers.timestep_spacing(250, n, spacing)
        return
    t = samplers.timestep_spacing(250, n, spacing)
    assert t.dtype == np.int32 and t.shape == (n,) and np.all(np.diff(t) > 0) and 1 <= t[0] and t[-1] <= 250
    if spacing in ("linspace", "trailing"):
        assert t[-1] == 250
    if spacing in ("linspace", "leading", "quadratic") and n > 1:
        assert t[0] == 1


def test_karras_grid():
    sig = samplers.karras_sigmas(10, 0.002, 80.0)
    np.testing.assert_allclose(sig[[0, -1]], [80.0, 0.002])
    assert np.all(np.diff(sig) < 0) and np.all(np.diff(np.log(sig)) < np.diff(np.log(sig))[0] + 1e-9)
    np.testing.assert_allclose(np.diff(samplers.karras_sigmas(5, 1.0, 9.0, rho=1.0)), -2.0)
    grid = samplers.time_grid(12, log_snr_fn=COSINE, spacing="karras")
    np.testing.assert_allclose(np.exp(-0.5 * grid.log_snr[:-1]), samplers.karras_sigmas(12, 0.002, 80.0),
                               rtol=1e-3)  # the inverted log-SNR hits the rho-grid
    assert grid.times[-1] == 0 and np.isinf(grid.log_snr[-1])
    d = samplers.time_grid(8, schedule=SCHEDULE, spacing="karras")
    assert d.times.dtype == np.int32 and np.all(np.diff(d.times) < 0)


def test_x0_clipping_and_dynamic_thresholding():
    den = samplers.Denoiser(_model(MIX1), clip_x0=(-1.0, 1.0))
    x = 3.0 * jax.random.normal(KEY, (64, 1))
    lam = SCHEDULE.log_snr[100]
    x0, eps, _ = jax.jit(lambda x: den(x, 100, lam))(x)
    alpha, sigma = diffusion.alpha_sigma(lam)
    assert float(jnp.max(jnp.abs(x0))) <= 1.0 and float(jnp.max(jnp.abs(x0))) == 1.0
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)  # eps recomputed
    z = jnp.array([[0.5, -0.2, 0.9], [3.0, -6.0, 1.0]])
    out = samplers.dynamic_threshold(z, 0.5)
    np.testing.assert_allclose(out[0], z[0])       # quantile below 1: untouched
    np.testing.assert_allclose(out[1], jnp.clip(z[1], -3.0, 3.0) / 3.0)


# ---------------------------------------------------------------------------
# Bad arguments: clear ValueErrors, before anything is traced.
# ---------------------------------------------------------------------------

BAD = [
    (dict(sampler="ddim", eta=1.5), "eta"),
    (dict(sampler="ddim", eta=-0.1), "eta"),
    (dict(num_steps=1001), "more than the T=1000"),
    (dict(spacing="cubic"), "spacing must be one of"),
    (dict(spacing="quadratic", num_steps=900), "repeats timesteps"),
    (dict(spacing="karras", num_steps=200), "repeats timesteps"),
    (dict(sampler="euler_a"), "sampler must be one of"),
    (dict(sampler="langevin", parameterization="mean"), "needs the score"),
    (dict(sampler="ode", parameterization="mu"), "needs the score"),
    (dict(parameterization="mean"), "parameterization must be one of"),
    (dict(variance_type="learned", num_steps=100), "cannot be respaced"),
    (dict(variance_type="wide"), "variance type must be one of"),
    (dict(sampler="ddim", steps_per_level=3), "unknown option"),
    (dict(sampler="ode", method="rk4"), "method must be one of"),
    (dict(log_snr_fn=COSINE), "exactly one"),
    (dict(schedule=None), "exactly one"),
    (dict(schedule=None, log_snr_fn=COSINE, spacing="leading", num_steps=10), "continuous-time"),
    (dict(schedule=None, log_snr_fn=COSINE), "num_steps is required"),
    (dict(spacing="karras", sigma_min=1e-5, num_steps=10), "sigma_min"),
    (dict(sigma_max=10.0), "spacing='karras'"),
    (dict(trajectory_every=0), "trajectory_every"),
    (dict(clip_x0=(1.0, -1.0)), "clip_x0"),
    (dict(threshold=1.5), "threshold"),
    (dict(guidance_scale=2.0), "null_label"),
    (dict(labels=np.zeros(3, np.int32)), "labels must have shape"),
    (dict(sampler="pc", snr=0.0), "snr"),
    (dict(sampler="langevin", steps_per_level=0), "steps_per_level"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_before_tracing(kwargs, match):
    fn, count = _counting(_model(MIX1))
    with pytest.raises(ValueError, match=match):
        samplers.sample(fn, KEY, (4, 1), **{"schedule": SCHEDULE, **kwargs})
    assert count[0] == 0


def test_clip_x0_accepts_a_bool():
    """clip_x0=True is the data range (-1, 1), False no clipping: the same samples as the
    explicit (-1.0, 1.0) and None."""
    model = lambda x, t: jnp.full_like(x, 0.3)  # eps_hat = 0.3: x0_hat leaves [-1, 1] at high noise
    run = lambda clip: np.asarray(samplers.sample(model, jax.random.PRNGKey(0), (4, 2), schedule=SCHEDULE,
                                                  num_steps=5, sampler="ddim", clip_x0=clip))
    np.testing.assert_array_equal(run(True), run((-1.0, 1.0)))
    np.testing.assert_array_equal(run(False), run(None))
    assert not np.allclose(run(True), run(False))
    assert np.abs(run(True)).max() <= 1.0 + 1e-6
