"""A 2-D convolution with hand-written gradients for XLA:CPU (``conv_nhwc``).

XLA:CPU runs its own convolution gradients far slower than forward convolutions inside
loops (docs/performance.md); ``conv_nhwc`` has the same values with both gradients written
as forward NHWC convolutions, which XLA:CPU hands to YNNPACK in and out of loops. ``vdm.models.layers.conv3x3`` uses it
through ``conv_general_dilated`` on the CPU backend only; GPUs and TPUs keep XLA's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _conv(x, w, strides, padding, lhs_dilation=(1, 1)):
    return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, w, strides, padding):
    """2-D convolution (NHWC input, HWIO kernel, ``padding`` as ((lo, hi), (lo, hi))) whose
    gradients are written as the ops XLA:CPU runs fast.

    Inside a ``lax.scan`` (the train loop's steps per call) XLA:CPU's own gradient
    convolutions fall off its fast path (the kernel gradient to ~0.5 GFLOP/s; see
    docs/performance.md). Here the input gradient is a forward convolution of the
    (stride-dilated) output gradient with the flipped kernel, and the kernel gradient a
    forward convolution of the input with batch and channels swapped (``_kernel_grad``);
    XLA:CPU runs both through YNNPACK, as it does forward convolutions. The values are
    those of ``lax.conv_general_dilated``'s gradients up to float rounding.
    """
    return _conv(x, w, strides, padding)


def _kernel_grad(x, dy, kernel_size, strides, padding):
    """dw[i, j, c, o] = sum_{n, h, w} xp[n, s h + i, s w + j, c] dy[n, h, w, o] (xp the padded input),
    written as one forward NHWC convolution with batch and channels swapped: the input is x
    as [C, H, W, N] (batch C, features N), the kernel dy as [Ho, Wo, N, O] dilated by the
    strides, and the [C, KH', KW', O] output is cut to the kernel size (KH' > KH only where
    the strides leave input rows unused)."""
    xt = x.transpose(3, 1, 2, 0)
    dw = jax.lax.conv_general_dilated(xt, dy.transpose(1, 2, 0, 3), (1, 1), padding, rhs_dilation=strides,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.float32)
    return dw[:, :kernel_size[0], :kernel_size[1]].transpose(1, 2, 0, 3)


def _conv_nhwc_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, res, dy):
    x, w = res
    KH, KW = w.shape[:2]
    pads_t = []
    for d, k in enumerate((KH, KW)):
        lo = k - 1 - padding[d][0]
        pads_t.append((lo, x.shape[1 + d] + k - 2 - lo - (dy.shape[1 + d] - 1) * strides[d]))
    dx = _conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1), pads_t, lhs_dilation=strides)
    dw = _kernel_grad(x, dy, (KH, KW), strides, padding)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count, precision):
    """``conv_nhwc`` behind the ``lax.conv_general_dilated`` signature that ``nn.Conv`` calls."""
    if set(lhs_dilation) | set(rhs_dilation) | {feature_group_count} != {1}:
        raise ValueError("conv_nhwc supports neither dilation nor feature groups")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
