"""Classifier guidance against the Gaussian-mixture oracle (the exact posterior classifier is the
responsibilities of vdm.exact), in every parameterization and several samplers; the noisy
classifier's training, resume and the checks made before guided sampling."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import classifier_guidance, diffusion, exact, noisy_classifier_train, samplers, schedules

# Three well-separated components in 2-D (centres 6 apart, standard deviations <= 0.7).
MIX = exact.gaussian_mixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.0]], [[0.5, 0.3], [0.25, 0.5], [0.4, 0.4]])
SCHEDULE = schedules.discrete_schedule("cosine", 1000)
CLASSIFIER = exact.classifier_log_prob(MIX)
LEVELS = classifier_guidance.levels(schedule=SCHEDULE)
KEY = jax.random.PRNGKey(0)


def _noisy_inputs(t):
    """x_t ~ q(x_t) at each example's level t (its own), from exact mixture samples."""
    k0, k1 = jax.random.split(KEY)
    return diffusion.sample_q_xt_given_x0(k1, exact.sample(k0, MIX, len(t)), SCHEDULE.log_snr[t])[0]


def _guided(parameterization, labels, scale, model=None):
    model = model or exact.model_fn(MIX, parameterization, schedule=SCHEDULE)
    return classifier_guidance.classifier_guidance(model, CLASSIFIER, labels, scale, log_snr_fn=LEVELS,
                                                   parameterization=parameterization)


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_guided_unconditional_denoiser_is_the_conditional_one_at_every_level(parameterization):
    """s = 1, p(k | x_t) = r_k(x_t): eps - sigma grad log r_k = eps_k at each of the T = 1000 levels
    (one example per level, labels cycling over the components), to float32 rounding: the two
    parts alpha x0_hat and sigma eps_hat of x_t agree within 8 ulps of |x_t| (the classifier
    gradient is an O(alpha) difference of O(|x_t|) terms, so finer agreement is not available)."""
    t = jnp.arange(1, SCHEDULE.T + 1, dtype=jnp.int32)
    x, labels = _noisy_inputs(t), t % 3
    lam = SCHEDULE.log_snr[t]
    cond_fn = exact.conditional_model_fn(MIX, parameterization, schedule=SCHEDULE)
    guided, cond = jax.jit(lambda x, t: (_guided(parameterization, labels, 1.0)(x, t), cond_fn(x, t, labels)))(x, t)
    alpha, sigma = (np.asarray(a, np.float64)[:, None] for a in diffusion.alpha_sigma(lam))
    (x0_g, eps_g), (x0_c, eps_c) = ([np.asarray(v, np.float64) for v in
                                     diffusion.x0_eps_from_output(out, x, lam, parameterization)]
                                    for out in (guided, cond))
    ulp = np.finfo(np.float32).eps * (np.abs(np.asarray(x)).max(axis=1, keepdims=True) + 1.0)
    assert np.all(np.abs(alpha * (x0_g - x0_c)) <= 8 * ulp)
    assert np.all(np.abs(sigma * (eps_g - eps_c)) <= 8 * ulp)


def test_classifier_scale_one_plus_w_is_classifier_free_guidance_and_they_compose():
    """Exact models: classifier guidance at s = 1 + w equals classifier-free guidance with w (Ho &
    Salimans 2022, §3.2), and classifier guidance s on top of classifier-free w equals s + w + 1
    on the unconditional model (both are eps-space sums)."""
    t = jnp.arange(3, SCHEDULE.T + 1, 4, dtype=jnp.int32)
    x, labels = _noisy_inputs(t), (t // 4) % 3
    cond = exact.conditional_model_fn(MIX, "v", schedule=SCHEDULE)
    lam = SCHEDULE.log_snr[t]
    eps = lambda out: np.asarray(diffusion.convert(out, x, lam, "v", "eps"))
    cfg = samplers.classifier_free_guidance(cond, labels, 1.5, null_label=3)
    fns = (_guided("v", labels, 2.5), cfg, _guided("v", labels, 0.75, model=cfg), _guided("v", labels, 3.25))
    outs = [eps(o) for o in jax.jit(lambda x, t: [f(x, t) for f in fns])(x, t)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs[2], outs[3], rtol=1e-4, atol=1e-4)


def test_guidance_is_dropped_at_snr_zero():
    """At log-SNR -inf x_t is independent of y: the guided output equals the unguided one, finite."""
    flow = schedules.continuous_schedule("flow")
    model = exact.model_fn(MIX, "v", log_snr_fn=flow)
    guided = classifier_guidance.classifier_guidance(model, CLASSIFIER, jnp.zeros(8, jnp.int32), 4.0,
                                                     log_snr_fn=flow, parameterization="v")
    x, t = jax.random.normal(KEY, (8, 2)), jnp.ones(8)
    out, plain = jax.jit(lambda x, t: (guided(x, t), model(x, t)))(x, t)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler,steps,options", [("ancestral", 50, {}), ("ddim", 25, {}),
                                                    ("dpm_solver", 15, {}), ("edm", 20, {"S_churn": 10.0})])
def test_guided_sampling_puts_samples_on_the_labelled_component(sampler, steps, options):
    """s = 1 with the exact classifier: >= 98% of samples of label k lie on component k (most
    responsible at the data level), for each sampler in its one compiled scan."""
    n = 300
    labels = jnp.arange(n) % 3
    model = _guided("eps", labels, 1.0)
    x = samplers.sample(model, jax.random.PRNGKey(1), (n, 2), sampler=sampler, schedule=SCHEDULE,
                        num_steps=steps, **options)
    comp = np.asarray(jnp.argmax(exact.responsibilities(MIX, x), axis=-1))
    for k in range(3):
        assert np.mean(comp[np.asarray(labels) == k] == k) >= 0.98, (sampler, k)


# ---------------------------------------------------------------------------
# The noisy classifier: training, resume, loading, and the checks before guided sampling.
# ---------------------------------------------------------------------------


def _tiny_config(num_steps):
    import configs.classifier.digits as cfg

    c = cfg.get_config()
    c.model.update(dict(ch=8, ch_mult=(1,), num_res_blocks=1, num_groups=4))
    c.train.update(dict(num_steps=num_steps, batch_size=8, log_every=2, checkpoint_every=2, keep_checkpoints=5))
    c.eval.update(dict(every=4, num_levels=2, batch_size=99))
    c.diffusion.T = 10
    return c


def test_classifier_training_resumes_exactly_and_loads_with_its_checks(tmp_path):
    """A rerun from the step-2 checkpoint of a 4-step run ends on that run's step-4 state (data
    position, keys, optimiser and EMA restored); the loaded classifier refuses another data shape
    and labels outside its classes."""
    import shutil

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = noisy_classifier_train.train_and_evaluate(_tiny_config(4), a)
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "checkpoints", "4"))
    resumed = noisy_classifier_train.train_and_evaluate(_tiny_config(4), b)
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    lines = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert any("eval_accuracy_t10" in r for r in lines) and os.path.exists(os.path.join(b, "classifier.json"))

    run = noisy_classifier_train.load_classifier(b)
    assert run.step == 4 and run.num_classes == 10 and run.data_shape == (8, 8, 1)
    x = jnp.zeros((3, 8, 8, 1))
    logp = run.log_prob(x, jnp.zeros(3), jnp.array([0, 4, 9]))
    assert logp.shape == (3,) and np.all(np.asarray(logp) < 0)
    noisy_classifier_train.check_guidance_inputs(run, (8, 8, 1), np.arange(10))
    with pytest.raises(ValueError, match=r"label\(s\) \[10\] out of range: the classifier has 10 classes"):
        noisy_classifier_train.check_guidance_inputs(run, (8, 8, 1), np.array([3, 10]))
    with pytest.raises(ValueError, match=r"trained on data of shape \(8, 8, 1\), but the model samples "
                                         r"shape \(32, 32, 3\)"):
        noisy_classifier_train.check_guidance_inputs(run, (32, 32, 3), np.array([3]))


@pytest.mark.parametrize("field,value,match", [
    ("model.name", "unet", "must be one of \\('noisy_classifier',\\)"),
    ("model.num_classes", 3, "model.num_classes is set from the data"),
    ("eval.num_levels", 1, "config.eval.num_levels = 1"),
    ("diffusion.schedule", "nope", "diffusion.schedule"),
])
def test_bad_classifier_config_fails_before_compiling(tmp_path, field, value, match):
    c = _tiny_config(2)
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        noisy_classifier_train.train_and_evaluate(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
