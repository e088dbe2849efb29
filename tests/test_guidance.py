"""Class-conditional training and classifier-free guidance: label dropout, labels in every
objective, a conditional model on the two-Gaussian toy data, guided sampling compiled once
per w, and the validation of conditional configs. (Device-count invariance and exact resume
of a conditional run: tests/test_train.py, whose tiny config is class-conditional.)"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_worker import tiny_config
from vdm import build
from vdm import objective
from vdm import config as config_lib
from vdm import data
from vdm import samplers
from vdm import schedules


def test_label_dropout_rate_and_null_class_exactly_where_dropped():
    """drop_labels: the dropped fraction matches p_uncond (within 4 binomial standard errors),
    kept labels are unchanged, dropped ones are the null class, and the decision of an example
    depends on its global index only (two device shards give the whole batch's result)."""
    n, p, null = 4000, 0.2, 10
    drop = jax.jit(lambda key, index, labels: objective.drop_labels(key, index, labels, p, null))
    key, index = jax.random.PRNGKey(3), jnp.arange(n)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, null, n), jnp.int32)
    out = np.asarray(drop(key, index, labels))
    dropped = out == null
    assert abs(dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / n), dropped.mean()
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    halves = [drop(key, index[s], labels[s]) for s in (slice(0, n // 2), slice(n // 2, n))]
    np.testing.assert_array_equal(np.concatenate(halves), out)
    other_step = np.asarray(drop(jax.random.PRNGKey(4), index, labels)) == null
    assert 0 < np.mean(other_step != dropped) < 2 * p  # a new step draws anew


@pytest.fixture(scope="module")
def toy_setup():
    c = tiny_config()
    ds = data.build_dataset(c.data, split="train", global_batch_size=16, seed=0)
    setup = build.build_setup(c, ds)
    return c, ds, setup, setup.init_params(jax.random.PRNGKey(0))


def test_objective_uses_the_null_class_exactly_where_labels_are_dropped(toy_setup):
    """The training loss with label dropout (p = 0.5) equals, example by example, the loss without
    dropout given drop_labels' labels; the class embedding makes the two label sets differ."""
    c, ds, setup, params = toy_setup
    batch = ds.get_batch(0)
    x, labels = batch["x"][0], batch["label"][0]
    key, index = jax.random.PRNGKey(5), jnp.arange(len(x))
    loss = jax.jit(setup.objective.loss, static_argnums=5)
    dropped = objective.drop_labels(key, index, labels, c.train.label_dropout, setup.network.num_classes)
    assert 0 < int(jnp.sum(dropped == setup.network.num_classes)) < len(x)
    params = jax.tree.map(lambda a: a + 0.1, params)  # a non-zero class embedding
    trained, _ = loss(params, key, index, x, {}, True, labels)
    given, _ = loss(params, key, index, x, {}, False, dropped)
    kept, _ = loss(params, key, index, x, {}, False, labels)
    np.testing.assert_allclose(trained, given, rtol=1e-6)
    assert not np.allclose(trained, kept)


# The discrete kinds (simple, hybrid, vlb) share one model call in build_objective (the objective
# test above runs simple); hybrid covers the learned variance, vdm and continuous simple the other two.
OBJECTIVES = [
    dict(loss=dict(name="hybrid"), diffusion=dict(variance="learned_range"), eval=dict(elbo="exact")),
    dict(loss=dict(name="vdm"), diffusion=dict(time="continuous", schedule="learned", T=0),
         sample=dict(num_steps=10)),
    dict(loss=dict(name="simple"), diffusion=dict(time="continuous", schedule="cosine", T=0,
                                                  parameterization="edm"), sample=dict(num_steps=10)),
]


@pytest.mark.parametrize("changes", OBJECTIVES, ids=["hybrid", "vdm", "continuous-simple"])
def test_every_objective_conditions_each_example_on_its_own_label(changes):
    """Discrete (hybrid; -ELBO by the exact sum, chunked over t) and continuous time (vdm, EDM's
    simple loss): changing example 0's label changes its loss and its -ELBO and nothing of the
    other examples' losses."""
    c = tiny_config()
    for section, fields in changes.items():
        c[section].update(fields)
    config_lib.validate(c)
    ds = data.build_dataset(c.data, split="train", global_batch_size=8, seed=0)
    setup = build.build_setup(c, ds)
    params = jax.tree.map(lambda a: a + 0.1, setup.init_params(jax.random.PRNGKey(0)))
    x, labels = ds.get_batch(0)["x"][0], jnp.zeros((8,), jnp.int32)
    state = setup.objective.init_loss_state()
    key, index = jax.random.PRNGKey(1), jnp.arange(8)

    @jax.jit
    def losses_and_bound(labels):
        loss, _ = setup.objective.loss(params, key, index, x, state, False, labels)
        return loss, setup.objective.nelbo_bpd(params, key, x[0], labels[0])

    a, bound_a = losses_and_bound(labels)
    b, bound_b = losses_and_bound(labels.at[0].set(1))
    assert np.all(np.isfinite(a)) and np.isfinite(bound_a)
    assert abs(float(a[0] - b[0])) > 1e-6 and abs(float(bound_a - bound_b)) > 1e-6
    np.testing.assert_array_equal(a[1:], b[1:])


def test_conditional_toy_model_samples_the_requested_component():
    """Trained on the two-Gaussian data with each component a class (label dropout 0.1, 400
    pmapped steps in one scan), the label-k samples fall on component k (x on its side of 0, the
    components at x = -+0.98 with std 0.2) for >= 95% of them, at w = 0 and with guidance w = 1;
    the guided sampler compiles once per w (new labels or parameters reuse it)."""
    from vdm import parallel, train_step

    c = tiny_config()
    c.model.update(dict(hidden=64, depth=2, embed_dim=16))
    c.optim.update(dict(lr=3e-3, warmup_steps=20, ema_decay=0.99))
    c.train.update(dict(num_steps=400, batch_size=128, steps_per_call=400, label_dropout=0.1))
    ds = data.build_dataset(c.data, split="train", global_batch_size=128, seed=0)
    setup = build.build_setup(c, ds)
    params = setup.init_params(jax.random.PRNGKey(0))
    tx = train_step.make_optimizer(c.optim, c.train.num_steps)
    state = train_step.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
                                  rng=jax.random.PRNGKey(1), loss_state={})
    batches = {k: np.stack([ds.get_batch(i)[k] for i in range(400)], axis=1) for k in ("x", "label")}
    state, _ = train_step.make_p_train(setup.objective, tx, c.optim)(parallel.replicate(state), batches)
    ema = jax.device_get(jax.tree.map(lambda a: a[0], state.ema_params))  # the first device's copy
    labels = np.repeat(np.arange(2, dtype=np.int32), 200)

    def draw(w, labels, params=ema):
        return np.asarray(setup.sample(params, jax.random.PRNGKey(7), num_samples=len(labels), sampler="ddim",
                                       num_steps=25, spacing="linspace", options={}, clip_x0=False,
                                       labels=labels, guidance_scale=w))

    for w in (0.0, 1.0):
        x = draw(w, labels)
        on_component = np.where(labels == 0, x[:, 0] < 0, x[:, 0] > 0)
        for k in (0, 1):
            assert on_component[labels == k].mean() >= 0.95, (w, k, on_component[labels == k].mean())
    size = samplers.front._run_jit._cache_size()
    draw(1.0, labels[::-1].copy(), jax.tree.map(lambda a: a * 1.01, ema))
    assert samplers.front._run_jit._cache_size() == size


def test_classifier_free_guidance_extrapolates_and_refuses_a_negative_scale():
    """samplers.classifier_free_guidance gives (1 + w) cond - w uncond; sample() refuses w < 0."""
    def model_fn(x, t, labels):
        return x * (1.0 + labels[:, None].astype(jnp.float32)) + t[:, None]

    x, t, labels = jnp.ones((3, 2)), jnp.arange(3.0), jnp.array([0, 1, 2])
    null = model_fn(x, t, jnp.full((3,), 5))
    expected = 3.0 * model_fn(x, t, labels) - 2.0 * null
    np.testing.assert_allclose(samplers.classifier_free_guidance(model_fn, labels, 2.0, 5)(x, t), expected,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        samplers.sample(model_fn, jax.random.PRNGKey(0), (3, 2), sampler="ddim",
                        schedule=schedules.discrete_schedule("linear", 50), labels=labels, guidance_scale=-1.0,
                        null_label=5)


@pytest.mark.parametrize("changes, field, expected", [
    (dict(data=dict(source="toy", name="swissroll")), "config.data.conditional",
     "swissroll' has no labels"),
    (dict(data=dict(source="toy", name="gaussians2d"), train=dict(label_dropout=1.0)),
     "config.train.label_dropout", r"\[0.0, 1.0\)"),
])
def test_conditional_config_without_labels_fails_before_compiling(changes, field, expected):
    c = config_lib.defaults()
    c.data.conditional = True
    for section, fields in changes.items():
        c[section].update(fields)
    with pytest.raises(ValueError, match=f"{field}.*{expected}"):
        config_lib.validate(c)


def test_label_dropout_needs_a_conditional_run():
    c = config_lib.defaults()
    c.train.label_dropout = 0.1
    with pytest.raises(ValueError, match="config.train.label_dropout = 0.1 .*config.data.conditional = True"):
        config_lib.validate(c)


def test_npz_without_labels_fails_when_conditional(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((10, 4, 4, 1), np.uint8))
    c = config_lib.defaults()
    c.data.update(dict(source="npz", path=str(path), num_test=2, conditional=True))
    with pytest.raises(ValueError, match="config.data.conditional.*npz_label_key"):
        config_lib.validate(c)


def test_toy_mixture_labels_are_its_components():
    """A Gaussian mixture's labels are its components: the same points as ``sample`` and, for the
    two Gaussians 5 standard deviations from 0 in x, the label is the side of 0; the data set's
    batches (fresh stream and fixed test set) carry them."""
    from vdm import toy_data

    dist = toy_data.get("gaussians2d")
    x, k = dist.sample_labelled(0, 2000)
    np.testing.assert_array_equal(x, dist.sample(0, 2000))
    np.testing.assert_array_equal(k, (x[:, 0] > 0).astype(np.int32))
    for split in ("train", "test"):
        cfg = tiny_config().data
        b = next(iter(data.build_dataset(cfg, split=split, global_batch_size=16, seed=0).iterate_epoch(16))) \
            if split == "test" else data.build_dataset(cfg, split=split, global_batch_size=16, seed=0).get_batch(0)
        np.testing.assert_array_equal(b["label"], (b["x"][..., 0] > 0).astype(np.int32))
