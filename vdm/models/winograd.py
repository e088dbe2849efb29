"""Winograd convolution F(m x m, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional
Neural Networks"), its kernel gradient included.

Each m x m block of outputs of a 3x3, stride-1 convolution is Y = A^T [(G g G^T) * (B^T d B)] A
per input and output channel pair, summed over input channels, with d the n x n input tile
(n = m + 2) that covers the block, g the 3x3 kernel and * the elementwise product. The sum over
input channels of the n^2 elementwise products is n^2 matmuls [tiles, C] @ [C, O]: per output
and channel pair n^2 / m^2 multiplications where the direct convolution needs 9.

- F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity: 2.25 multiplications (4x fewer).
- F(2x2, 3x3), points 0, 1, -1 and infinity: 4 multiplications (2.25x fewer), for sizes that
  are even but not multiples of 4.

The transforms are exact in exact arithmetic; in float32 they round. Against a float64
convolution of the same float32 inputs (batch 8, 64-256 channels, relative rms error) XLA's
direct convolution is off by 4.2-7.4e-7, F(2x2) by 2.6-5.0e-7 (each output sums C products
where the direct one sums 9 C) and F(4x4) by 1.8-3.3e-6 (B^T's entries up to 5 and A^T's up to
8 scale the rounding); tests/test_winograd.py bounds each.

The kernel gradient follows from Y being linear in U = G g G^T: dL/dU = sum over tiles of
(B^T d B) * (A dY A^T), one [C, tiles] @ [tiles, O] matmul per entry, and dL/dg = G^T (dL/dU) G:
n^2 / m^2 multiplications per output and channel pair where the per-tap matmuls need 9.
"""
from __future__ import annotations

import functools
import operator
from fractions import Fraction
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

_h, _s, _t = Fraction(1, 2), Fraction(1, 6), Fraction(1, 24)


class Transforms(NamedTuple):
    """The matrices of F(m x m, 3x3), as rows of exact coefficients."""
    m: int        # output block size
    BT: tuple     # [n, n], input tile -> Winograd domain
    G: tuple      # [n, 3], kernel -> Winograd domain
    AT: tuple     # [m, n], Winograd domain -> output block


F2 = Transforms(
    m=2,
    BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    G=((1, 0, 0), (_h, _h, _h), (_h, -_h, _h), (0, 0, 1)),
    AT=((1, 1, 1, 0), (0, 1, -1, -1)),
)
F4 = Transforms(
    m=4,
    BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    G=((Fraction(1, 4), 0, 0), (-_s, -_s, -_s), (-_s, _s, -_s), (_t, 2 * _t, 4 * _t), (_t, -2 * _t, 4 * _t),
       (0, 0, 1)),
    AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)


def transforms_for(H: int, W: int) -> Transforms:
    """F(4x4) where both sizes are multiples of 4, else F(2x2) where both are even."""
    if H % 4 == 0 and W % 4 == 0:
        return F4
    if H % 2 == 0 and W % 2 == 0:
        return F2
    raise ValueError(f"Winograd F(m x m, 3x3) needs even spatial sizes; got {H}x{W}")


def _transpose(matrix):
    return tuple(zip(*matrix))


def _apply(matrix, parts: Sequence[jax.Array]) -> tuple:
    """matrix @ parts along a Python axis: row i gives sum_j matrix[i][j] parts[j], zeros skipped."""
    def term(c, p):
        return p if c == 1 else -p if c == -1 else float(c) * p
    return tuple(functools.reduce(operator.add, (term(c, p) for c, p in zip(row, parts) if c)) for row in matrix)


def _input_transform(x, t: Transforms):
    """B^T d B for every tile d of the NHWC x padded by one row and column of zeros, as the
    matmul operand [n^2 (col, row), tiles (N, H/m, W/m), C]. Tile k along an axis covers padded
    rows m k .. m k + n - 1, read as group k of m rows and the first two rows of group k + 1 of
    the input padded to H + m rows (no strided slices)."""
    N, H, W, C = x.shape
    m, n = t.m, len(t.BT)
    Ht, Wt = H // m, W // m
    groups = jnp.pad(x, [(0, 0), (1, m - 1), (1, m - 1), (0, 0)]).reshape(N, Ht + 1, m, Wt + 1, m, C)
    row_parts = [groups[:, :-1, i] for i in range(m)] + [groups[:, 1:, i] for i in range(n - m)]
    rows = jnp.stack(_apply(t.BT, row_parts))                 # [n (row), N, Ht, Wt + 1, m, C]
    col_parts = [rows[:, :, :, :-1, i] for i in range(m)] + [rows[:, :, :, 1:, i] for i in range(n - m)]
    return jnp.stack(_apply(t.BT, col_parts)).reshape(n * n, N * Ht * Wt, C)


def _kernel_transform(w, t: Transforms):
    """G g G^T for the HWIO kernel w: [n (col), n (row), C, O]."""
    rows = jnp.stack(_apply(t.G, [w[0], w[1], w[2]]))         # [n (row), 3 (col), C, O]
    return jnp.stack(_apply(t.G, [rows[:, 0], rows[:, 1], rows[:, 2]]))


def _output_transform(products, t: Transforms):
    """A^T M A for the products M [n (col), n (row), N, Ht, Wt, O]: the output [N, m Ht, m Wt, O]."""
    n, _, N, Ht, Wt, O = products.shape
    cols = jnp.stack(_apply(t.AT, [products[i] for i in range(n)]), axis=4)  # [n (row), N, Ht, Wt, m, O]
    y = jnp.stack(_apply(t.AT, [cols[i] for i in range(n)]), axis=2)         # [N, Ht, m, Wt, m, O]
    return y.reshape(N, t.m * Ht, t.m * Wt, O)


def conv3x3(x, w):
    """3x3 convolution at stride 1 with one row and column of zero padding on each side
    ('SAME'), NHWC input x with even H and W, HWIO kernel w: F(4x4, 3x3) where H and W are
    multiples of 4, else F(2x2, 3x3)."""
    if w.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(m x m, 3x3) needs a 3x3 kernel; got {w.shape[:2]}")
    N, H, W, C = x.shape
    t = transforms_for(H, W)
    n = len(t.BT)
    v = _input_transform(x, t)
    u = _kernel_transform(w, t).reshape(n * n, C, -1)
    products = jnp.matmul(v, u, preferred_element_type=jnp.float32)
    return _output_transform(products.reshape(n, n, N, H // t.m, W // t.m, -1), t).astype(x.dtype)


def kernel_grad3x3(x, dy):
    """The gradient of ``conv3x3(x, w)`` with respect to w, given the output gradient dy
    [N, H, W, O]: G^T [sum over tiles (B^T d B) * (A dY A^T)] G, as HWIO [3, 3, C, O].

    The input tiles are transformed from x in its own NHWC layout, as in ``conv3x3``, and the
    n^2 matmuls contract their tile axis: [tiles, C]^T @ [tiles, O]. Transforming x as
    [C, N, H, W] instead (both matmul operands row-major) made XLA:CPU fuse the transpose with
    the recomputed GroupNorm and SiLU that produce x, a scalar loop that cost more than the
    transform (docs/performance.md item 18).
    """
    N, H, W, C = x.shape
    t = transforms_for(H, W)
    O = dy.shape[3]
    m, n = t.m, len(t.BT)
    v = _input_transform(x, t)
    blocks = dy.reshape(N, H // m, m, W // m, m, O)
    A = _transpose(t.AT)
    rows = jnp.stack(_apply(A, [blocks[:, :, i] for i in range(m)]))              # [n (row), N, Ht, Wt, m, O]
    d = jnp.stack(_apply(A, [rows[:, :, :, :, i] for i in range(m)]))            # [n (col), n (row), N, Ht, Wt, O]
    grad_u = jnp.einsum("ktc,kto->kco", v, d.reshape(n * n, -1, O),
                        preferred_element_type=jnp.float32).reshape(n, n, C, O)
    GT = _transpose(t.G)
    cols = jnp.stack(_apply(GT, [grad_u[i] for i in range(n)]))                  # [3 (col), n (row), C, O]
    return jnp.stack(_apply(GT, [cols[:, i] for i in range(n)])).astype(x.dtype)  # [3 (row), 3 (col), C, O]
