"""Schedules: tables equal float64 references written here from the papers' formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import schedules


# ---------------------------------------------------------------------------
# float64 references, straight from the papers (naive products are fine in float64).
# ---------------------------------------------------------------------------


def ref_betas(name, T, **kw):
    if name == "linear":  # Ho et al. §4; Nichol & Dhariwal rescale by 1000/T
        scale = 1000.0 / T if kw.get("rescale", True) else 1.0
        return np.linspace(1e-4 * scale, 0.02 * scale, T)
    if name == "scaled_linear":  # Rombach et al.: linear in sqrt(beta)
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
    if name == "constant":
        return np.full(T, kw.get("beta", 0.02))
    u = np.arange(T + 1) / T
    if name == "cosine":  # Nichol & Dhariwal eq. 17, s = 0.008
        ab = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        ab = ab / ab[0]
    else:  # sigmoid, Jabri et al. 2022 (start -3, end 3, tau 1), clipped at 1e-9 as in their code
        sig = lambda z: 1 / (1 + np.exp(-z))
        ab = np.clip((sig(3.0) - sig(6.0 * u - 3.0)) / (sig(3.0) - sig(-3.0)), 1e-9, 1.0)
    return np.minimum(1 - ab[1:] / ab[:-1], 0.999)


def ref_tables(betas):
    """Ho et al. eqs. 4, 6, 7 in float64, paper indexing (index 0 = data)."""
    b = np.concatenate([[0.0], betas])
    a = 1 - b
    ab = np.cumprod(a)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_snr = np.log(ab / (1 - ab))
        post_var = b * (1 - ab_prev) / (1 - ab)
        coef_x0 = np.sqrt(ab_prev) * b / (1 - ab)
        coef_xt = np.sqrt(a) * (1 - ab_prev) / (1 - ab)
    return dict(betas=b, alphas=a, alpha_bars=ab, log_snr=log_snr, posterior_variance=post_var,
                posterior_mean_coef_x0=coef_x0, posterior_mean_coef_xt=coef_xt)


CASES = [("linear", 1000, {}), ("linear", 100, {}), ("linear", 20, {"rescale": False}),
         ("scaled_linear", 1000, {}), ("constant", 250, {}), ("cosine", 1000, {}),
         ("cosine", 50, {}), ("sigmoid", 1000, {}), ("sigmoid", 30, {})]


@pytest.mark.parametrize("name,T,kw", CASES)
def test_discrete_tables_match_float64_reference(name, T, kw):
    s = schedules.discrete_schedule(name, T, **kw)
    assert s.T == T
    ref = ref_tables(ref_betas(name, T, **kw))
    for field, want in ref.items():
        got = np.asarray(getattr(s, field))
        assert got.dtype == np.float32 and got.shape == (T + 1,), field
        # t = 1..T, both ends included; index 0 is the data level, checked below.
        np.testing.assert_allclose(got[1:], want[1:], rtol=2e-6, atol=1e-12, err_msg=field)
    # Ho et al.'s clipped log-variance: log beta~_2 at t = 1, log beta~_t after.
    np.testing.assert_allclose(np.asarray(s.posterior_log_variance_clipped)[1:],
                               np.log(np.concatenate([[ref["posterior_variance"][2]],
                                                      ref["posterior_variance"][2:]])),
                               rtol=2e-6)
    # The data level: beta_0 = 0, alpha_bar_0 = 1, log_snr_0 = +inf; everything else finite.
    assert s.betas[0] == 0 and s.alpha_bars[0] == 1 and s.log_snr[0] == np.inf
    for field in s._fields:
        arr = np.asarray(getattr(s, field))
        assert np.all(np.isfinite(arr[1:])), field
        assert np.all(np.isfinite(arr[:1])) or field == "log_snr", field
    assert np.all(np.diff(np.asarray(s.log_snr)) < 0)  # strictly decreasing


def test_rescaled_linear_keeps_total_noise():
    """Nichol & Dhariwal's 1000/T rescaling keeps sum(beta) (the total noise) roughly fixed."""
    sums = [float(np.sum(schedules.discrete_schedule("linear", T).betas)) for T in (100, 1000, 4000)]
    np.testing.assert_allclose(sums, sums[1], rtol=1e-2)


def test_single_step_schedule_is_finite():
    s = schedules.discrete_schedule("constant", 1, beta=0.5)
    assert s.T == 1 and np.isclose(float(s.alpha_bars[1]), 0.5)
    assert all(np.all(np.isfinite(np.asarray(getattr(s, f))[1:])) for f in s._fields)


# ---------------------------------------------------------------------------
# Continuous schedules.
# ---------------------------------------------------------------------------

T_GRID = np.concatenate([[1e-5, 1e-3], np.linspace(0.01, 0.99, 23), [0.999, 1.0]])


def ref_continuous(name, t):
    """(log_snr, d log_snr / dt) in float64."""
    if name == "cosine":  # alpha = cos(theta), theta linear between the endpoint angles
        a, b = math.atan(math.exp(-10.0)), math.atan(math.exp(10.0))
        th = a + t * (b - a)
        return -2 * np.log(np.tan(th)), -4 * (b - a) / np.sin(2 * th)
    if name == "vp_linear":  # Song et al.: alpha_bar = exp(-int beta), tau = 1e-5 + (1 - 1e-5) t
        tau = 1e-5 + (1 - 1e-5) * t
        B = 0.1 * tau + 0.5 * 19.9 * tau ** 2
        ab = np.exp(-B)
        return np.log(ab / (1 - ab)), -(1 - 1e-5) * (0.1 + 19.9 * tau) / (1 - ab)
    if name == "flow":  # rectified flow: alpha = 1 - t, sigma = t
        return 2 * np.log((1 - t) / t), -2 / (t * (1 - t))
    return 13.3 - 18.3 * t, np.full_like(t, -18.3)  # vdm_linear


@pytest.mark.parametrize("name", schedules.CONTINUOUS_SCHEDULES)
def test_continuous_schedule_matches_float64_reference(name):
    fn = schedules.continuous_schedule(name)
    grid = T_GRID[:-1] if name == "flow" else T_GRID  # flow: log-SNR(1) = -inf (tests/test_paths.py)
    lam, dlam = schedules.log_snr_and_derivative(fn, jnp.asarray(grid, jnp.float32))
    want, dwant = ref_continuous(name, np.float64(np.float32(grid)))
    assert np.all(np.isfinite(lam)) and np.all(np.isfinite(dlam))
    np.testing.assert_allclose(lam, want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dlam, dwant, rtol=1e-4)
    assert np.all(np.diff(np.asarray(lam)) < 0) and np.all(np.asarray(dlam) < 0)


def test_continuous_endpoints():
    vdm = schedules.continuous_schedule("vdm_linear")
    cos = schedules.continuous_schedule("cosine", log_snr_max=13.3, log_snr_min=-5.0)
    for fn in (vdm, cos):
        np.testing.assert_allclose([fn(0.0), fn(1.0)], [13.3, -5.0], rtol=1e-5)
    # vp_linear starts at score_sde's eps = 1e-5, where the SDE's log-SNR is finite.
    vp = schedules.continuous_schedule("vp_linear")
    np.testing.assert_allclose(vp(0.0), -math.log(math.expm1(0.1e-5 + 0.5 * 19.9e-10)), rtol=1e-5)
    assert np.isfinite(vp(0.0)) and np.isfinite(vp(1.0))


# ---------------------------------------------------------------------------
# Bad arguments.
# ---------------------------------------------------------------------------


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match=r"schedule name.*'linear'.*'sigmoid'"):
        schedules.discrete_schedule("quadratic", 10)
    for T in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="T "):
            schedules.discrete_schedule("cosine", T)
    with pytest.raises(ValueError, match="bad arguments"):
        schedules.discrete_schedule("cosine", 10, beta=0.1)
    with pytest.raises(ValueError, match="betas outside"):
        schedules.discrete_schedule("linear", 10)  # 1000/T rescaling pushes beta_T past 1
    with pytest.raises(ValueError, match=r"continuous schedule name.*'vdm_linear'"):
        schedules.continuous_schedule("linear")
    with pytest.raises(ValueError, match="bad arguments"):
        schedules.continuous_schedule("vdm_linear", s=0.1)
    for t in (np.array([0, 3]), np.array([1, 11]), np.array([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"1\.\.10"):
            schedules.check_timesteps(t, 10)
    schedules.check_timesteps(np.array([1, 10]), 10)
    jax.jit(lambda t: schedules.check_timesteps(t, 10) or t)(jnp.array([0]))  # traced: unchecked
