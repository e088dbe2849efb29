"""``layers.GroupNorm`` is ``flax.linen.GroupNorm`` with its sums reordered: the same parameters, values
and gradients, each group normalised to mean 0 and variance 1, and the same params after a few
training steps of a ResBlock and an AttnBlock."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.block_training import assert_params_after_steps_unchanged
from vdm.models import layers


def _inputs(shape, key=0):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(key), shape) + 1.5  # a mean far from 0, as E[x^2] - mean^2 meets it
    channels = shape[-1]
    params = {"params": {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(key + 1), (channels,)),
                         "bias": 0.3 * jax.random.normal(jax.random.PRNGKey(key + 2), (channels,))}}
    return x, params


@pytest.mark.parametrize("shape, groups", [((2, 6, 4, 16), 4), ((3, 4, 4, 32), 32), ((2, 5, 12), 3), ((4, 8), 2)])
def test_values_and_gradients_equal_flax(shape, groups):
    x, params = _inputs(shape)
    ours, ref = layers.GroupNorm(groups), nn.GroupNorm(groups, epsilon=1e-6)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, ref.init(jax.random.PRNGKey(0), x))
    y, vjp = jax.vjp(ours.apply, params, x)
    y_ref, vjp_ref = jax.vjp(ref.apply, params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), y.shape)
    for got, want in zip(jax.tree.leaves(vjp(cotangent)), jax.tree.leaves(vjp_ref(cotangent))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_each_group_has_mean_zero_and_unit_variance():
    x, _ = _inputs((2, 5, 3, 12))
    module = layers.GroupNorm(3, epsilon=0.0)
    y = module.apply(module.init(jax.random.PRNGKey(0), x), x)  # scale 1, bias 0 at initialisation
    groups = np.asarray(y, np.float64).reshape(2, 15, 3, 4).transpose(0, 2, 1, 3).reshape(2, 3, 60)
    np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(-1), 1.0, atol=1e-4)


def test_bfloat16_output_float32_statistics():
    x, params = _inputs((2, 4, 4, 8))
    x = x.astype(jnp.bfloat16)
    y = layers.GroupNorm(4, dtype=jnp.bfloat16).apply(params, x)
    y_ref = nn.GroupNorm(4, epsilon=1e-6, dtype=jnp.bfloat16).apply(params, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-2, atol=1e-2)


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="num_groups=3 does not divide the 8 channels"):
        layers.GroupNorm(3).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 8)))


def test_params_after_steps_equal_with_flax_group_norm(monkeypatch):
    flax_layers = []

    def flax_group_norm(**kwargs):
        flax_layers.append(nn.GroupNorm(**kwargs))
        return flax_layers[-1]

    assert_params_after_steps_unchanged(lambda: monkeypatch.setattr(layers, "GroupNorm", flax_group_norm))
    assert len(flax_layers) == 3  # the reference run met the ResBlock's two GroupNorms and the AttnBlock's
