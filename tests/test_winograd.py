"""Winograd F(2x2, 3x3) (``vdm.models.winograd``) and its use in the CPU convolution.

The reference is the direct convolution summed in float64 with numpy, so a wrong transform,
a wrong tile order or a wrong interleave of the 2x2 output blocks fails; the gradients and the
trained params are compared with XLA's own convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.models import cpu_conv, winograd


def _direct_float64(x, w):
    """y[n, h, w, o] = sum_{i, j, c} xp[n, h + i, w + j, c] w[i, j, c, o], xp padded by one."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    _, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + H, j:j + W], w[i, j]) for i in range(3) for j in range(3))


def _xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,out_channels", [((2, 6, 8, 5), 7), ((1, 4, 2, 64), 64), ((3, 2, 10, 1), 3)])
def test_winograd_equals_the_direct_convolution(shape, out_channels):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, shape[3], out_channels)) / np.sqrt(9 * shape[3])
    want = _direct_float64(x, w)
    got = np.asarray(jax.jit(winograd.conv3x3)(x, w), np.float64)
    scale = np.sqrt(np.mean(want ** 2))
    assert np.sqrt(np.mean((got - want) ** 2)) < 1e-6 * scale
    # no less accurate than float32's direct convolution, to within rounding
    direct_error = np.abs(np.asarray(_xla(x, w), np.float64) - want).max()
    assert np.abs(got - want).max() < 4 * direct_error + 1e-6 * scale


def test_winograd_of_a_one_tap_kernel_shifts_the_input():
    """A kernel with a single 1 at tap (i, j) gives y[h, w] = xp[h + i, w + j] (to rounding: the
    transforms add and halve)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 6, 2))
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            w = np.zeros((3, 3, 2, 2), np.float32)
            w[i, j] = np.eye(2)
            np.testing.assert_allclose(winograd.conv3x3(x, jnp.asarray(w)), xp[:, i:i + 4, j:j + 6], rtol=1e-6, atol=1e-6)


def test_winograd_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even H, W"):
        winograd.conv3x3(jnp.zeros((1, 5, 4, 2)), jnp.zeros((3, 3, 2, 2)))


def test_conv_nhwc_with_winograd_has_xlas_values_and_gradients(winograd_calls):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6, 64))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 64, 64)) / 24
    ours = lambda x, w: cpu_conv.conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1)))
    cotangent = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 6, 64))
    y_ref, vjp_ref = jax.vjp(_xla, x, w)
    y, vjp = jax.vjp(ours, x, w)
    grads = vjp(cotangent)
    assert len(winograd_calls) == 2  # the forward pass and the input gradient
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, vjp_ref(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_winograd_only_where_it_applies(winograd_calls):
    """Fewer than 64 channels, odd sizes, strides > 1 and bfloat16 keep the direct convolution."""
    for shape, w_shape, stride, dtype in [((1, 4, 4, 32), (3, 3, 32, 64), 1, jnp.float32),
                                          ((1, 5, 4, 64), (3, 3, 64, 64), 1, jnp.float32),
                                          ((1, 4, 4, 64), (3, 3, 64, 64), 2, jnp.float32),
                                          ((1, 4, 4, 64), (3, 3, 64, 64), 1, jnp.bfloat16)]:
        pads = jax.lax.padtype_to_pads(shape[1:3], (3, 3), (stride, stride), "SAME")
        cpu_conv.conv_nhwc(jnp.zeros(shape, dtype), jnp.zeros(w_shape, dtype), (stride, stride), tuple(map(tuple, pads)))
    assert winograd_calls == []
    cpu_conv.conv_nhwc(jnp.zeros((1, 4, 4, 64)), jnp.zeros((3, 3, 64, 64)), (1, 1), ((1, 1), (1, 1)))
    assert winograd_calls == [(1, 4, 4, 64)]
