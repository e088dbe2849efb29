"""vdm.metrics (sample metrics against closed forms) and vdm.likelihood (the ELBO over a split against exact models)."""
import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.stats import norm

from vdm import exact, likelihood, losses, schedules
from vdm.metrics import classifier, inception, sample_quality


# ---------------------------------------------------------------------------
# MMD.
# ---------------------------------------------------------------------------


def _expected_rbf(m1, s1, m2, s2, h, d):
    """E k(x, y) for x ~ N(m1, s1^2 I_d), y ~ N(m2, s2^2 I_d), k = exp(-|x - y|^2 / (2 h^2))."""
    v = h ** 2 + s1 ** 2 + s2 ** 2
    return (h ** 2 / v) ** (d / 2) * math.exp(-np.sum((np.asarray(m1) - np.asarray(m2)) ** 2) / (2 * v))


def test_mmd_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((400, 2)), rng.standard_normal((400, 2))
    same = sample_quality.mmd(x, y, bandwidths=1.0)
    shifted = [sample_quality.mmd(x, y + s, bandwidths=1.0) for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.01
    assert 0.01 < shifted[0] < shifted[1] < shifted[2]
    # Median heuristic and a set of bandwidths behave the same way.
    assert abs(sample_quality.mmd(x, y)) < 0.01 < sample_quality.mmd(x, y + 1.0)
    h = [0.5, 1, 2]
    assert abs(sample_quality.mmd(x, y, bandwidths=h)) < 0.01 < sample_quality.mmd(x, y + 1.0, bandwidths=h)


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_mmd_is_unbiased(shift):
    """The mean of MMD_u^2 over many small-sample replicates equals the population MMD^2
    (closed form for Gaussians); the biased V-statistic (diagonal included) does not."""
    d, n, h, reps = 2, 8, 1.0, 400
    m2 = np.array([shift, 0.0])
    pop = (_expected_rbf(0, 1, 0, 1, h, d) + _expected_rbf(m2, 1.3, m2, 1.3, h, d)
           - 2 * _expected_rbf(0, 1, m2, 1.3, h, d))
    rng = np.random.default_rng(1)
    est, biased = [], []
    for _ in range(reps):
        x, y = rng.standard_normal((n, d)), m2 + 1.3 * rng.standard_normal((n, d))
        est.append(sample_quality.mmd(x, y, bandwidths=h))
        k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * h ** 2))
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    se = np.std(est, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(est) - pop) < 3 * se
    assert abs(np.mean(biased) - pop) > 5 * np.std(biased, ddof=1) / math.sqrt(reps)


def test_median_bandwidth_matches_population_median():
    # x - x' ~ N(0, 2) for x, x' ~ N(0, 1): the median of |x - x'| is sqrt(2) * Phi^{-1}(3/4).
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal(1000), rng.standard_normal(1000)
    assert sample_quality.median_bandwidth(x, y) == pytest.approx(math.sqrt(2) * norm.ppf(0.75), rel=0.03)


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="same number of dimensions"):
        sample_quality.mmd(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="bandwidths"):
        sample_quality.mmd(np.zeros((5, 2)), np.ones((5, 2)), bandwidths=0.0)


# ---------------------------------------------------------------------------
# Sliced Wasserstein.
# ---------------------------------------------------------------------------


def _quantile_sample(m, s, n):
    return m + s * norm.ppf((np.arange(n) + 0.5) / n)


def test_wasserstein_1d_matches_gaussian_closed_form():
    """W2(N(m1, s1^2), N(m2, s2^2)) = sqrt((m1 - m2)^2 + (s1 - s2)^2)."""
    m1, s1, m2, s2 = 0.0, 1.0, 2.0, 1.5
    w2 = math.hypot(m1 - m2, s1 - s2)
    x, y = _quantile_sample(m1, s1, 20000), _quantile_sample(m2, s2, 20000)
    assert sample_quality.sliced_wasserstein(jax.random.key(0), x, y) == pytest.approx(w2, rel=2e-3)
    rng = np.random.default_rng(3)
    xr, yr = m1 + s1 * rng.standard_normal(20000), m2 + s2 * rng.standard_normal(30000)
    assert sample_quality.sliced_wasserstein(jax.random.key(0), xr, yr) == pytest.approx(w2, rel=0.02)


def test_wasserstein_1d_exact_on_empirical_measures():
    u = np.array([3.0, -1.0, 0.5])
    assert sample_quality.wasserstein_1d(u, np.repeat(u, 4)) == pytest.approx(0.0, abs=1e-12)  # same measure
    assert sample_quality.wasserstein_1d(u, u + 2.0) == pytest.approx(2.0)                    # a translation
    # {0} vs {0, 1}: half the mass moves by 1, so W1 = 1/2 and W2 = sqrt(1/2).
    assert sample_quality.wasserstein_1d([0.0], [0.0, 1.0], p=1) == pytest.approx(0.5)
    assert sample_quality.wasserstein_1d([0.0], [0.0, 1.0], p=2) == pytest.approx(math.sqrt(0.5))


def test_sliced_wasserstein_2d_isotropic_gaussians():
    """Projections of N(m, s^2 I) are N(theta.m, s^2): SW2^2 = |m1 - m2|^2 / d + (s1 - s2)^2."""
    rng = np.random.default_rng(4)
    dm, s1, s2 = np.array([1.0, 2.0]), 1.0, 0.5
    x, y = s1 * rng.standard_normal((4000, 2)), dm + s2 * rng.standard_normal((4000, 2))
    sw = sample_quality.sliced_wasserstein(jax.random.key(1), x, y, num_projections=1000)
    assert sw == pytest.approx(math.sqrt(dm @ dm / 2 + (s1 - s2) ** 2), rel=0.03)


def test_toy_sample_metrics_and_mode_fractions():
    rng = np.random.default_rng(8)
    data = np.where(rng.random((3000, 1)) < 1 / 3, -4.0, 4.0) + rng.standard_normal((3000, 1))
    fresh = np.where(rng.random((3000, 1)) < 1 / 3, -4.0, 4.0) + rng.standard_normal((3000, 1))
    lopsided = np.where(rng.random((3000, 1)) < 0.5, -4.0, 4.0) + rng.standard_normal((3000, 1))
    good, bad = (sample_quality.toy_sample_metrics(jax.random.key(0), s, data) for s in (fresh, lopsided))
    assert good["mmd"] < bad["mmd"] and good["sliced_wasserstein"] < bad["sliced_wasserstein"]
    fr = sample_quality.mode_fractions(data, [-4.0, 4.0])
    assert fr.sum() == pytest.approx(1.0) and fr[1] == pytest.approx(2 / 3, abs=0.03)
    np.testing.assert_array_equal(sample_quality.mode_fractions([[0.0, 1.0], [5.0, 5.0]], [[0, 0], [5, 5], [9, 9]]),
                                  [0.5, 0.5, 0.0])


# ---------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; diagonal: the sum over coordinates.
    assert sample_quality.frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    assert sample_quality.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(
        3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    # General covariances: against the formula with scipy's sqrtm of cov1 cov2.
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    c1, c2, m1, m2 = A @ A.T, B @ B.T, rng.standard_normal(6), rng.standard_normal(6)
    ref = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    fd = sample_quality.frechet_distance(m1, c1, m2, c2)
    assert fd == pytest.approx(ref, rel=1e-8)
    assert fd == pytest.approx(sample_quality.frechet_distance(m2, c2, m1, c1), rel=1e-8)  # symmetric


def test_frechet_distance_zero_for_identical_stats_even_singular():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((8, 3))
    c = A @ A.T                     # rank 3 of 8: singular
    m = rng.standard_normal(8)
    # Zero up to the rounding of sqrt near the zero eigenvalues.
    assert abs(sample_quality.frechet_distance(m, c, m, c)) < 1e-6 * np.trace(c)
    assert sample_quality.frechet_distance(m, c, m, c + 1e-3 * np.eye(8)) > 0


def test_gaussian_stats_of_features():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((20000, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 0.0]
    mu, cov = sample_quality.gaussian_stats(f)
    np.testing.assert_allclose(mu, [1.0, -1.0, 0.0], atol=0.05)
    np.testing.assert_allclose(cov, np.diag([1.0, 4.0, 0.25]), atol=0.1)
    g = rng.standard_normal((20000, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 0.0]
    fd = sample_quality.frechet_distance_of_features
    assert fd(f, g) < 0.01 < fd(f, g + 0.3)


# ---------------------------------------------------------------------------
# The negative ELBO over a split, with exact models.
# ---------------------------------------------------------------------------

SEED002 = exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0)   # the 1-D mixture of seed 002


@pytest.fixture(scope="module")
def mixture_setup():
    """The exact denoiser of the seed 002 mixture (learned = moment-matched variance), 48 data
    points, and its exact-sum ELBO terms (built once so that jit compiles are reused)."""
    schedule = schedules.discrete_schedule("constant", 20, beta=0.1)
    model_fn = exact.model_fn(SEED002, "eps", schedule=schedule, variance_type="learned")
    x = np.asarray(exact.sample(jax.random.key(0), SEED002, 48))
    kw = dict(variance_type="learned", decoder="gaussian")
    terms = likelihood.discrete_elbo_terms(lambda p: model_fn, schedule, chunk=20, **kw)
    return schedule, model_fn, x, kw, terms


def test_negative_elbo_equals_per_example_losses_averaged(mixture_setup):
    schedule, model_fn, x, kw, terms = mixture_setup
    batches = [x[:16], x[16:32], x[32:]]
    key = jax.random.key(3)
    res = likelihood.negative_elbo(terms, None, batches, key)
    elbo = jax.jit(lambda k, b: losses.discrete_elbo(model_fn, k, b, schedule, **kw)["total"])
    total = np.concatenate([np.asarray(elbo(jax.random.fold_in(key, i), b), np.float64)
                            for i, b in enumerate(batches)])
    assert res["unit"] == "nats" and res["num_examples"] == 48
    assert res["terms"]["total"]["mean"] == pytest.approx(total.mean(), rel=1e-5)
    assert res["terms"]["total"]["stderr"] == pytest.approx(total.std(ddof=1) / math.sqrt(48), rel=1e-4)
    parts = sum(res["terms"][k]["mean"] for k in ("prior", "diffusion", "decoder"))
    assert parts == pytest.approx(res["terms"]["total"]["mean"], rel=1e-5)

    # Bits per dimension: the same numbers divided by D ln 2 (D = 1 here).
    bpd = likelihood.negative_elbo(terms, None, batches, key, num_dims=1)
    assert bpd["unit"] == "bits/dim"
    assert bpd["terms"]["total"]["mean"] == pytest.approx(total.mean() / math.log(2), rel=1e-5)

    # A mask leaves padded examples out; a dict batch works like an array.
    mask = np.arange(48) % 3 != 0
    masked = likelihood.negative_elbo(terms, None, [{"x": b, "mask": mask[i * 16:(i + 1) * 16]}
                                            for i, b in enumerate(batches)], key)
    assert masked["num_examples"] == mask.sum()
    assert masked["terms"]["total"]["mean"] == pytest.approx(total[mask].mean(), rel=1e-5)


def test_exact_sum_agrees_with_monte_carlo(mixture_setup):
    """The exact sum over all T terms and the K-sample Monte-Carlo estimate of the same bound
    agree within the Monte-Carlo standard error, and the exact mixture denoiser (with its
    moment-matched variance) is tight: the ELBO-vs-exact-NLL gap is ~0."""
    schedule, model_fn, x, kw, terms = mixture_setup
    lp = lambda v: jnp.log(1 / 3 * jnp.exp(-0.5 * (v[:, 0] + 4) ** 2) + 2 / 3 * jnp.exp(-0.5 * (v[:, 0] - 4) ** 2)) \
        - 0.5 * math.log(2 * math.pi)
    key = jax.random.key(4)
    exact_sum = likelihood.negative_elbo(terms, None, [x[:16], x[16:32], x[32:]], key, log_prob_fn=lp)
    mc = likelihood.negative_elbo(likelihood.discrete_elbo_mc_terms(lambda p: model_fn, schedule, 8, **kw), None,
                          [x[:16], x[16:32], x[32:]], key, log_prob_fn=lp)
    e, m = exact_sum["terms"]["total"], mc["terms"]["total"]
    assert m["stderr"] > e["stderr"]
    # Paired: both estimates are of the same examples, so the error of the mean difference is
    # the spread of the per-example differences (the examples' own spread cancels).
    keys = [jax.random.fold_in(key, i) for i in range(3)]
    split = [x[:16], x[16:32], x[32:]]
    mc_fn = likelihood.discrete_elbo_mc_terms(lambda p: model_fn, schedule, 8, **kw)
    diff = np.concatenate([np.float64(terms(None, k, b)["total"]) - np.float64(mc_fn(None, k, b)["total"])
                           for k, b in zip(keys, split)])
    paired_se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert diff.mean() == pytest.approx(e["mean"] - m["mean"], abs=1e-6)
    assert paired_se < math.hypot(e["stderr"], m["stderr"])
    assert abs(diff.mean()) < 3 * paired_se
    gap = exact_sum["terms"]["gap"]
    assert abs(gap["mean"]) < 3 * gap["stderr"] + 0.02
    assert exact_sum["terms"]["exact_nll"]["mean"] == pytest.approx(-float(jnp.mean(lp(x))), rel=1e-6)


@pytest.fixture(scope="module")
def gaussian_data():
    mix = exact.gaussian_mixture([1.0], [[0.5, -0.3]], [[0.64, 1.2]])
    x = np.asarray(exact.sample(jax.random.key(0), mix, 256))
    lp = lambda v: jnp.sum(-0.5 * (v - mix.means[0]) ** 2 / mix.variances[0]
                           - 0.5 * jnp.log(2 * math.pi * mix.variances[0]), -1)
    return mix, x, lp


def test_elbo_gap_of_exact_gaussian_model_is_the_prior_mismatch(gaussian_data):
    """For Gaussian data the exact reverse kernels are Gaussian, so with the exact mean and
    (moment-matched) variance the only gap left is KL(q(x_T) || N(0, I)); with the fixed
    small variance instead the bound is loose by far more than its standard error."""
    mix, x, lp = gaussian_data
    schedule = schedules.discrete_schedule("linear", 30)
    a2 = float(jax.nn.sigmoid(schedule.log_snr[-1]))
    v_T = a2 * np.asarray(mix.variances[0]) + 1 - a2
    prior_gap = np.sum(0.5 * (v_T + a2 * np.asarray(mix.means[0]) ** 2 - 1 - np.log(v_T)))
    results = {}
    for vt in ("learned", "fixed_small"):
        model_fn = exact.model_fn(mix, "eps", schedule=schedule, variance_type=vt)
        terms = likelihood.discrete_elbo_terms(lambda p: model_fn, schedule, variance_type=vt, decoder="gaussian",
                                       chunk=30)
        results[vt] = likelihood.negative_elbo(terms, None, [x[:128], x[128:]], jax.random.key(5), log_prob_fn=lp)
    tight, loose = results["learned"]["terms"]["gap"], results["fixed_small"]["terms"]["gap"]
    assert abs(tight["mean"] - prior_gap) < 3 * tight["stderr"]
    assert loose["mean"] - prior_gap > 5 * loose["stderr"]


def test_continuous_vdm_elbo_of_exact_model_is_close_to_nll(gaussian_data):
    mix, x, lp = gaussian_data
    log_snr = schedules.continuous_schedule("vdm_linear")
    model_fn = exact.model_fn(mix, "eps", log_snr_fn=log_snr)
    k1 = likelihood.negative_elbo(
        likelihood.vdm_elbo_terms(lambda p: model_fn, lambda p, t: log_snr(t), 1, decoder="gaussian"),
        None, [x], jax.random.key(6), log_prob_fn=lp)
    k8 = likelihood.negative_elbo(
        likelihood.vdm_elbo_terms(lambda p: model_fn, lambda p, t: log_snr(t), 8, decoder="gaussian"),
        None, [x], jax.random.key(6), log_prob_fn=lp)
    # More Monte-Carlo samples per example shrink the standard error of the diffusion term.
    assert k8["terms"]["diffusion"]["stderr"] < 0.6 * k1["terms"]["diffusion"]["stderr"]
    gap = k8["terms"]["gap"]
    assert abs(gap["mean"]) < 3 * gap["stderr"] + 0.02


def test_vdm_eval_low_discrepancy_times_exact_T_sum_and_estimate_variance(gaussian_data):
    """Per-example low-discrepancy times keep the estimate unbiased (gap to the exact NLL ~ 0)
    with a smaller standard error than independent times; the exact T-step sum bounds the
    continuous bound from above (L_T >= L_inf, Kingma et al. §4.1); the one-draw
    estimate's variance, averaged over examples, is at most the variance of one-draw
    estimates across examples (law of total variance)."""
    mix, x, lp = gaussian_data
    log_snr = schedules.continuous_schedule("vdm_linear")
    model_fn = exact.model_fn(mix, "eps", log_snr_fn=log_snr)
    run = lambda terms: likelihood.negative_elbo(terms, None, [x], jax.random.key(7), log_prob_fn=lp)
    mc = {a: run(likelihood.vdm_elbo_terms(lambda p: model_fn, lambda p, t: log_snr(t), 8, decoder="gaussian",
                                   antithetic=a)) for a in (True, False)}
    for r in mc.values():
        assert abs(r["terms"]["gap"]["mean"]) < 3 * r["terms"]["gap"]["stderr"] + 0.02
    assert mc[True]["terms"]["diffusion"]["stderr"] < mc[False]["terms"]["diffusion"]["stderr"]
    exact_T = run(likelihood.vdm_elbo_exact_terms(lambda p: model_fn, lambda p, t: log_snr(t), 20, chunk=20,
                                          decoder="gaussian"))
    e, m = exact_T["terms"]["total"], mc[True]["terms"]["total"]
    assert e["mean"] - m["mean"] > 3 * math.hypot(e["stderr"], m["stderr"])  # T = 20 is far from the limit
    var = likelihood.vdm_estimate_variance(lambda p: model_fn, lambda p, t: log_snr(t), None, [x], jax.random.key(8), 16,
                                   decoder="gaussian")
    one_draw = run(likelihood.vdm_elbo_terms(lambda p: model_fn, lambda p, t: log_snr(t), 1, decoder="gaussian",
                                     antithetic=False))["terms"]["total"]["stderr"] ** 2 * x.shape[0]
    assert var["num_examples"] == x.shape[0] and 0 < var["terms"]["total"]["mean"] < 1.3 * one_draw


def test_elbo_table_json_and_errors(tmp_path, mixture_setup):
    schedule, model_fn, x, kw, terms = mixture_setup
    res = likelihood.negative_elbo(terms, None, [x[:16]], jax.random.key(0), method="exact sum, T=20")
    table = likelihood.format_table(res)
    for name in ("prior", "diffusion", "decoder", "total", "nats", "exact sum, T=20"):
        assert name in table
    path = likelihood.save_json(tmp_path / "out" / "elbo.json", res)
    with open(path) as f:
        assert json.load(f) == res
    with pytest.raises(ValueError, match="num_dims"):
        likelihood.negative_elbo(terms, None, [x[:16]], jax.random.key(0), num_dims=0)
    with pytest.raises(ValueError, match="'total'"):
        likelihood.negative_elbo(lambda p, k, v: {"prior": v[:, 0]}, None, [x[:16]], jax.random.key(0))
    with pytest.raises(ValueError, match="no data"):
        likelihood.negative_elbo(terms, None, [], jax.random.key(0))


def test_epoch_batches_cover_a_split_once():
    from vdm import data

    ds = data.build_dataset(data.default_config(), split="test", global_batch_size=1, seed=0,
                            local_device_count=1)
    batches = list(likelihood.epoch_batches(ds, 128))
    assert [b["x"].shape for b in batches] == [(128, 8, 8, 1)] * 3
    assert sum(int(b["mask"].sum()) for b in batches) == ds.num_examples == 297
    assert batches[0]["label"].shape == (128,)


# ---------------------------------------------------------------------------
# Feature classifier and InceptionV3.
# ---------------------------------------------------------------------------


def _two_class_images(rng, n, label=None):
    """8x8 grey images: class 0 bright on the left half, class 1 on the right, plus noise
    (random classes, or all of class ``label``)."""
    labels = rng.integers(0, 2, n) if label is None else np.full(n, label)
    cols = np.arange(8)[None, None, :]
    bright = np.where(labels[:, None, None] == 0, cols < 4, cols >= 4)
    x = np.where(bright, 0.8, -0.8) + 0.2 * rng.standard_normal((n, 8, 8))
    return np.clip(x, -1, 1)[..., None].astype(np.float32), labels.astype(np.int32)


def test_feature_classifier_trains_once_then_loads_from_cache(tmp_path):
    batch_fn = lambda step: _two_class_images(np.random.default_rng(step), 64)
    features = classifier.load_or_train_classifier(str(tmp_path), batch_fn, 2, (8, 8, 1), num_steps=20)
    cached = tmp_path / classifier.CLASSIFIER_FILE
    assert cached.exists()

    def no_data(step):
        raise AssertionError("a cached classifier must not be retrained")

    again = classifier.load_or_train_classifier(str(tmp_path), no_data, 2, (8, 8, 1), num_steps=20)
    rng = np.random.default_rng(100)
    real_a, _ = _two_class_images(rng, 300)
    real_b, _ = _two_class_images(rng, 300)
    np.testing.assert_allclose(again(real_a), features(real_a), rtol=1e-6)
    assert features(real_a).shape == (300, 128)
    noise = np.clip(rng.standard_normal(real_a.shape), -1, 1).astype(np.float32)
    one_class, _ = _two_class_images(rng, 300, label=0)
    fd_real = sample_quality.classifier_frechet_distance(features, real_a, real_b)
    assert fd_real < sample_quality.classifier_frechet_distance(features, real_a, noise)
    assert fd_real < sample_quality.classifier_frechet_distance(features, real_a, one_class)
    with pytest.raises(ValueError, match="delete it"):
        classifier.load_or_train_classifier(str(tmp_path), no_data, 3, (8, 8, 1))
    with pytest.raises(ValueError, match="images must have shape"):
        features(np.zeros((2, 4, 4, 1)))


def test_inception_missing_weights_file_gives_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.inception_features(str(tmp_path / "nope.npz"))


def test_inception_loads_pytorch_state_dict_by_name(tmp_path):
    """A state dict with torchvision's names and OIHW conv layouts (random values of the right
    shapes, plus keys the network ignores) loads into the Flax network, which then maps
    images to 2048 pool3 features. The network has torchvision's 21,785,568 parameters
    (InceptionV3 without its aux and fc heads)."""
    shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(inception._inception_shapes()))
    assert sum(math.prod(s.shape) for k, s in shapes.items() if k[0] == "params") == 21_785_568
    rng = np.random.default_rng(0)
    state, expected = {"fc.weight": np.zeros((1008, 2048), np.float32)}, {}
    for key, s in shapes.items():
        collection, *modules, layer, leaf = key
        value = rng.standard_normal(s.shape).astype(np.float32)
        expected[key] = value
        suffix, _ = inception._TORCH_NAMES[(collection, layer, leaf)]
        name = ".".join(modules + [suffix])
        state[name] = np.transpose(value, (3, 2, 0, 1)) if leaf == "kernel" else value
        if leaf == "var":
            state[".".join(modules + ["bn.num_batches_tracked"])] = np.zeros((), np.int64)
    path = tmp_path / "inception_fid.npz"
    np.savez(path, **state)
    variables = inception.load_inception_variables(str(path))
    loaded = flax.traverse_util.flatten_dict(variables)
    assert loaded.keys() == expected.keys()
    k = ("params", "Mixed_7c", "branch3x3_2a", "conv", "kernel")
    np.testing.assert_array_equal(loaded[k], expected[k])
    out = jax.eval_shape(inception.InceptionV3().apply, variables, jnp.zeros((2, 28, 28, 1)))
    assert out.shape == (2, 2048)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    np.savez(path, **state)
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight"):
        inception.load_inception_variables(str(path))


def test_dequantized_bound_is_on_the_8bit_scale_and_above_the_discrete_elbo():
    """On the same model, the uniformly dequantized -ELBO plus log2(127.5) per dim (a bound on the
    8-bit likelihood) is >= the discrete (discretized-decoder) -ELBO minus its standard error."""
    mix = exact.gaussian_mixture([0.5, 0.5], [[-0.5, -0.5], [0.5, 0.5]], 0.01)  # sd ~ 6 bins
    k_x, k_u, k_e = jax.random.split(jax.random.PRNGKey(21), 3)
    k8 = jnp.clip(jnp.round((exact.sample(k_x, mix, 200) + 1) * 127.5), 0, 255)
    xq = k8 / 127.5 - 1
    xd = xq + (jax.random.uniform(k_u, xq.shape) - 0.5) / 127.5
    sch = schedules.discrete_schedule("cosine", 100)
    model_of = lambda p: exact.model_fn(mix, "eps", schedule=sch)
    run = lambda dec, x, deq: likelihood.negative_elbo(
        likelihood.discrete_elbo_terms(model_of, sch, decoder=dec, chunk=25), None, [x], k_e, num_dims=2,
        dequantized=deq)["terms"]["total"]
    disc = run("discretized", xq, False)
    density = run("gaussian", xd, False)
    deq = likelihood.negative_elbo(likelihood.discrete_elbo_terms(model_of, sch, decoder="gaussian", chunk=25),
                                   None, [xd], k_e, num_dims=2, dequantized=True)
    assert "8-bit" in deq["unit"]
    np.testing.assert_allclose(deq["terms"]["total"]["mean"], density["mean"] + math.log2(127.5), rtol=1e-9)
    assert deq["terms"]["total"]["mean"] >= disc["mean"] - disc["stderr"], (deq["terms"]["total"], disc)
    with pytest.raises(ValueError, match="dequantized needs num_dims"):
        likelihood.negative_elbo(likelihood.discrete_elbo_terms(model_of, sch), None, [xd], k_e, dequantized=True)
