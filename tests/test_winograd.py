"""Winograd F(4x4, 3x3) and F(2x2, 3x3) (``vdm.models.winograd``), their kernel gradient, and
their use in the CPU convolution.

The references are the direct convolution and its kernel gradient summed in float64 with numpy,
so a wrong transform, a wrong tile order or a wrong interleave of the output blocks fails; the
gradients through ``conv_nhwc`` are compared with XLA's own convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.models import cpu_conv, winograd

# Relative rms error against float64 that each transform stays under (module docstring: F(2x2)
# rounds less than float32's direct convolution, F(4x4) a few times more).
RMS_BOUND = {2: 1e-6, 4: 6e-6}
# (x shape, output channels, the transforms that apply: 4 where H and W are multiples of 4)
SHAPES = [((2, 8, 12, 5), 7, 4), ((1, 4, 4, 64), 64, 4), ((2, 6, 8, 5), 7, 2), ((3, 2, 10, 1), 3, 2)]


def _padded(x):
    return np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))


def _direct_float64(x, w):
    """y[n, h, w, o] = sum_{i, j, c} xp[n, h + i, w + j, c] w[i, j, c, o], xp padded by one."""
    xp, w = _padded(x), np.asarray(w, np.float64)
    _, H, W, _ = x.shape
    return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + H, j:j + W], w[i, j]) for i in range(3) for j in range(3))


def _kernel_grad_float64(x, dy):
    """dw[i, j, c, o] = sum_{n, h, w} xp[n, h + i, w + j, c] dy[n, h, w, o]."""
    xp, dy = _padded(x), np.asarray(dy, np.float64)
    _, H, W, _ = x.shape
    return np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + H, j:j + W], dy) for j in range(3)])
                     for i in range(3)])


def _xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _relative_rms(got, want):
    return np.sqrt(np.mean((np.asarray(got, np.float64) - want) ** 2) / np.mean(want ** 2))


@pytest.mark.parametrize("shape,out_channels,m", SHAPES)
def test_winograd_equals_the_direct_convolution(shape, out_channels, m):
    assert winograd.transforms_for(*shape[1:3]).m == m
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, shape[3], out_channels)) / np.sqrt(9 * shape[3])
    want = _direct_float64(x, w)
    assert _relative_rms(jax.jit(winograd.conv3x3)(x, w), want) < RMS_BOUND[m]
    if m == 2:  # no less accurate than float32's direct convolution, to within rounding
        got = np.asarray(winograd.conv3x3(x, w), np.float64)
        direct_error = np.abs(np.asarray(_xla(x, w), np.float64) - want).max()
        assert np.abs(got - want).max() < 4 * direct_error + 1e-6 * np.sqrt(np.mean(want ** 2))


@pytest.mark.parametrize("shape,out_channels,m", SHAPES)
def test_winograd_kernel_gradient_equals_the_direct_one(shape, out_channels, m):
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    dy = jax.random.normal(jax.random.PRNGKey(3), (*shape[:3], out_channels))
    got = jax.jit(winograd.kernel_grad3x3)(x, dy)
    assert got.shape == (3, 3, shape[3], out_channels)
    assert _relative_rms(got, _kernel_grad_float64(x, dy)) < RMS_BOUND[m]


@pytest.mark.parametrize("width", [6, 8])  # F(2x2) and F(4x4)
def test_winograd_of_a_one_tap_kernel_shifts_the_input(width):
    """A kernel with a single 1 at tap (i, j) gives y[h, w] = xp[h + i, w + j] (to rounding)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, width, 2))
    xp = _padded(x)
    for i in range(3):
        for j in range(3):
            w = np.zeros((3, 3, 2, 2), np.float32)
            w[i, j] = np.eye(2)
            np.testing.assert_allclose(winograd.conv3x3(x, jnp.asarray(w)), xp[:, i:i + 4, j:j + width],
                                       rtol=1e-5, atol=1e-5)


def test_winograd_rejects_odd_sizes_and_other_kernels():
    with pytest.raises(ValueError, match="even spatial sizes; got 5x4"):
        winograd.conv3x3(jnp.zeros((1, 5, 4, 2)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"3x3 kernel; got \(1, 1\)"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)))


@pytest.mark.parametrize("width", [6, 8])  # F(2x2) and F(4x4)
def test_conv_nhwc_with_winograd_has_xlas_values_and_gradients(winograd_calls, width):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, width, 64))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 64, 64)) / 24
    ours = lambda x, w: cpu_conv.conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1)))
    cotangent = jax.random.normal(jax.random.PRNGKey(5), (2, 4, width, 64))
    y_ref, vjp_ref = jax.vjp(_xla, x, w)
    y, vjp = jax.vjp(ours, x, w)
    grads = vjp(cotangent)
    # the forward pass, the input gradient and the kernel gradient
    assert sorted(name for name, _ in winograd_calls) == ["conv3x3", "conv3x3", "kernel_grad3x3"]
    # y and dx have unit scale; F(4x4) rounds to ~2e-6 rms, a few times that at the worst element
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=5e-5)
    for got, want in zip(grads, vjp_ref(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_winograd_only_where_it_applies(winograd_calls):
    """Fewer than 32 channels (64 for F(2x2)), odd sizes, strides > 1 and bfloat16 keep the direct
    convolution."""
    for shape, w_shape, stride, dtype in [((1, 4, 4, 16), (3, 3, 16, 64), 1, jnp.float32),
                                          ((1, 4, 6, 32), (3, 3, 32, 64), 1, jnp.float32),
                                          ((1, 5, 4, 64), (3, 3, 64, 64), 1, jnp.float32),
                                          ((1, 4, 4, 64), (3, 3, 64, 64), 2, jnp.float32),
                                          ((1, 4, 4, 64), (3, 3, 64, 64), 1, jnp.bfloat16)]:
        pads = jax.lax.padtype_to_pads(shape[1:3], (3, 3), (stride, stride), "SAME")
        cpu_conv.conv_nhwc(jnp.zeros(shape, dtype), jnp.zeros(w_shape, dtype), (stride, stride), tuple(map(tuple, pads)))
    assert winograd_calls == []
    cpu_conv.conv_nhwc(jnp.zeros((1, 4, 4, 32)), jnp.zeros((3, 3, 32, 32)), (1, 1), ((1, 1), (1, 1)))
    cpu_conv.conv_nhwc(jnp.zeros((1, 4, 6, 64)), jnp.zeros((3, 3, 64, 64)), (1, 1), ((1, 1), (1, 1)))
    assert winograd_calls == [("conv3x3", (1, 4, 4, 32)), ("conv3x3", (1, 4, 6, 64))]
