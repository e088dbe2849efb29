"""A 2-D convolution with hand-written gradients for XLA:CPU (``conv_nhwc``).

XLA:CPU runs its own convolution gradients far slower than forward convolutions inside
loops (docs/performance.md); ``conv_nhwc`` has the same values with the input gradient
written as a forward NHWC convolution and the kernel gradient as one plain matmul per
kernel tap, both of which XLA:CPU hands to YNNPACK in and out of loops. On CPUs where it is
faster (``winograd_pays``), 3x3 stride-1 convolutions of 32 or more channels run the forward
pass, the input gradient and the kernel gradient as Winograd F(4x4, 3x3), or as F(2x2, 3x3) from
64 channels where the sizes are even but not multiples of 4 (``vdm.models.winograd``).
``vdm.models.layers.conv3x3`` uses it through ``conv_general_dilated`` on the CPU backend
only; GPUs and TPUs keep XLA's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdm.models import winograd


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
    (stride-dilated) output gradient with the flipped kernel, and the kernel gradient one
    [C, rows] @ [rows, O] matmul per kernel tap (``_kernel_grad``); XLA:CPU runs both through
    YNNPACK, as it does forward convolutions. Where ``_use_winograd`` says so, the forward
    pass, the input gradient (then a stride-1 convolution) and the kernel gradient are
    Winograd's. The values are those of ``lax.conv_general_dilated`` and its gradients up to
    float rounding.
    """
    return _forward(x, w, strides, padding)


def _forward(x, w, strides, padding, lhs_dilation=(1, 1)):
    """The convolution: Winograd's where it is faster on this CPU (``_use_winograd``), else
    XLA's (YNNPACK's) direct convolution."""
    if _use_winograd(x, w, strides, padding, lhs_dilation):
        return winograd.conv3x3(x, w)
    return _conv(x, w, strides, padding, lhs_dilation)


@functools.cache
def winograd_pays() -> bool:
    """Whether this host's CPU runs Winograd convolutions faster than the direct ones.

    Measured (docs/performance.md, issue 16 items 16 and 17): on an AVX2 x86 CPU without AVX-512
    (AMD EPYC, 2 GHz) YNNPACK's direct convolution runs at 30-39 GFLOP/s per core and Winograd's
    fewer multiplications win (F(4x4, 3x3): 1.35-2.5x per forward 3x3 convolution of 32-128
    channels at 16x16 and 32x32); on an AVX-512 CPU
    (sessions 5-8, 200+ GFLOP/s per core) the transforms cost more than they save. Other CPUs
    (ARM, no /proc/cpuinfo) keep the direct convolution.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "avx512f" not in flags


# Fewest channels in and out at which F(m x m, 3x3) beats the direct convolution in the UNets'
# train steps; below, its matmuls are too small to repay the transforms (performance.md items 16, 17).
_MIN_CHANNELS = {4: 32, 2: 64}


def _use_winograd(x, w, strides, padding, lhs_dilation):
    """float32, 3x3, stride 1 without input dilation, 'SAME', even sizes and enough channels
    (``_MIN_CHANNELS``); in bfloat16 the transforms' additions would round more than the direct
    convolution does."""
    _, H, W, C = x.shape
    return (winograd_pays() and x.dtype == w.dtype == jnp.float32 and w.shape[:2] == (3, 3)
            and tuple(strides) == tuple(lhs_dilation) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and H % 2 == 0 and W % 2 == 0
            and min(C, w.shape[3]) >= _MIN_CHANNELS[winograd.transforms_for(H, W).m])


def _output_gradient_pads(in_sizes, out_sizes, kernel_size, strides, padding):
    """(lo, hi) per spatial axis that pad dy, dilated by the strides, to in + K - 1 rows with
    dy[h] at row s h + K - 1 - pad_lo: then the K-row window starting at row h' (an input row)
    holds the output rows whose kernel window covers h' (negative where a pad crops)."""
    pads = []
    for size, out, k, s, (pad_lo, _) in zip(in_sizes, out_sizes, kernel_size, strides, padding):
        lo = k - 1 - pad_lo
        pads.append((lo, size + k - 2 - lo - (out - 1) * s))
    return pads


def _kernel_grad(x, dy, kernel_size, strides, padding):
    """dw[i, j, c, o] = sum_{n, h, w} xp[n, s h + i, s w + j, c] dy[n, h, w, o] (xp the padded input),
    as one [C, rows] @ [rows, O] matmul per kernel tap (i, j). Both operands are row-major with
    the contraction on the first one's last axis and the second one's first, the layout XLA:CPU
    hands to YNNPACK; one of them is a window copied out for the tap:

    - stride 1, windows of the output gradient: with h' = h + i - lo the input row,
      dw[i, j] = x' D_ij, where x' is x as [C, N*H*W] and D_ij[(n, h', w'), o] =
      dy[n, h' - i + lo, w' - j + lo, o] (zero outside dy). These windows exist only once dy
      does; windows of the input would be scheduled by XLA:CPU at the start of the backward
      pass, with the nine copies of every layer's input alive at once (2.2x the train step's
      temporary memory).
    - larger strides, windows of the input: dw[i, j] = X_ij dy', where X_ij[c, (n, h, w)] =
      xp[n, s h + i, s w + j, c] and dy' is dy as [N*Ho*Wo, O] (windows of dy would need it
      dilated by the stride, s^2 times the products).
    """
    N, H, W, C = x.shape
    _, Ho, Wo, O = dy.shape
    KH, KW = kernel_size
    if tuple(strides) == (1, 1):
        pads = _output_gradient_pads((H, W), (Ho, Wo), kernel_size, strides, padding)
        dyp = jax.lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
        x_rows = x.transpose(3, 0, 1, 2).reshape(C, N * H * W)
        windows = [dyp[:, KH - 1 - i:KH - 1 - i + H, KW - 1 - j:KW - 1 - j + W] for i in range(KH) for j in range(KW)]
        taps = [jnp.matmul(x_rows, window.reshape(N * H * W, O), preferred_element_type=jnp.float32)
                for window in windows]
    else:
        xp = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), padding[0], padding[1]))
        dy_rows = dy.reshape(N * Ho * Wo, O)
        windows = [xp[:, :, i:i + (Ho - 1) * strides[0] + 1:strides[0], j:j + (Wo - 1) * strides[1] + 1:strides[1]]
                   for i in range(KH) for j in range(KW)]
        taps = [jnp.matmul(window.reshape(C, N * Ho * Wo), dy_rows, preferred_element_type=jnp.float32)
                for window in windows]
    return jnp.stack(taps).reshape(KH, KW, C, O)


def _conv_nhwc_fwd(x, w, strides, padding):
    return _forward(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, res, dy):
    x, w = res
    KH, KW = w.shape[:2]
    pads_t = _output_gradient_pads(x.shape[1:3], dy.shape[1:3], (KH, KW), strides, padding)
    dx = _forward(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1), pads_t, lhs_dilation=strides)
    if _use_winograd(x, w, strides, padding, (1, 1)):
        dw = winograd.kernel_grad3x3(x, dy)
    else:
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
