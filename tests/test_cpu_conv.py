"""The CPU convolution's gradients leave training unchanged: params after a few AdamW (or SGD) steps of a
small conv net (3x3 convs at stride 1 and 2, GroupNorm + SiLU, as in the UNet) are the same with
``vdm.models.cpu_conv.conv_nhwc`` as with XLA's own convolution gradients, inside a ``lax.scan``
(the train loop's steps per call) as the training code runs them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm.models import cpu_conv

STRIDES = (1, 2, 1)


def _net(conv, strides, params, x):
    for w, s in zip(params, strides):
        pads = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (s, s), "SAME")
        x = conv(x, w, (s, s), tuple(tuple(p) for p in pads))
        g = x.reshape(*x.shape[:3], 4, -1)
        g = (g - g.mean((1, 2, 4), keepdims=True)) / jnp.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)
        x = jax.nn.silu(g.reshape(x.shape))
    return x


def _xla_conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


OPTIMIZERS = {"adamw": optax.adamw(1e-2), "sgd": optax.sgd(0.5)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(conv, strides, optimizer, params, xs, ys):
    opt = OPTIMIZERS[optimizer]

    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((_net(conv, strides, p, batch[0]) - batch[1]) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), (xs, ys))
    return params, losses


def test_params_after_steps_equal_with_conv_nhwc_and_xla_gradients():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    chans = (3, 8, 16, 8)
    params = [jax.random.normal(k, (3, 3, ci, co)) / np.sqrt(9 * ci)
              for k, ci, co in zip(keys, chans[:-1], chans[1:])]
    xs = jax.random.normal(keys[3], (4, 2, 9, 10, 3))  # 4 steps of batch 2, odd sizes
    ys = jax.random.normal(keys[4], (4, 2, 5, 5, 8))
    _assert_same_training(STRIDES, params, xs, ys)


@pytest.mark.parametrize("width", [6, 8])  # F(2x2) and F(4x4)
def test_params_after_steps_equal_with_winograd_and_xla(winograd_calls, width):
    """The same with Winograd's forward pass, input gradient and kernel gradient, forced on
    whatever this CPU is, for a 64 -> 64 channel convolution at stride 1 on even sizes."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    params = [jax.random.normal(keys[0], (3, 3, 3, 64)) / np.sqrt(27),
              jax.random.normal(keys[1], (3, 3, 64, 64)) / np.sqrt(9 * 64)]
    xs = jax.random.normal(keys[2], (3, 2, 8, width, 3))  # 3 steps of batch 2
    ys = jax.random.normal(keys[3], (3, 2, 8, width, 64))
    # SGD: Adam would scale the rounding noise of a near-zero gradient up to a few % of its step
    _assert_same_training((1, 1), params, xs, ys, optimizer="sgd")
    # the second conv's forward pass, input gradient and kernel gradient, traced once (the first
    # has 3 input channels)
    assert sorted(name for name, _ in winograd_calls) == ["conv3x3", "conv3x3", "kernel_grad3x3"]


def _assert_same_training(strides, params, xs, ys, optimizer="adamw"):
    ours, losses = _train(cpu_conv.conv_nhwc, strides, optimizer, params, xs, ys)
    ref, ref_losses = _train(_xla_conv, strides, optimizer, params, xs, ys)
    assert losses[-1] < losses[0]  # the steps move the params
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b, p in zip(ours, ref, params):
        assert np.abs(np.asarray(a) - np.asarray(p)).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
