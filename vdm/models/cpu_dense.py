"""A dense layer over the last axis with a hand-written kernel gradient for XLA:CPU (``dense``).

For a token-wise dense layer y = x W (x [..., C], W [C, O]), the kernel gradient
dW = x^T dy contracts over every leading axis (batch and positions). Inside the UNet's
train step XLA:CPU emits that product as a dot contracting the leading axis of both
operands, which YNNPACK does not take; it then runs in XLA's own dot at ~3 GFLOP/s against
17-29 for YNNPACK on a 2 GHz AVX2 core (docs/performance.md, "Against the PyTorch peer",
item 14).
Here x^T is materialised as a [C, rows] array behind ``lax.optimization_barrier`` (so
that XLA cannot fold the transpose back into the dot's dimension numbers), and dW is
the plain [C, rows] @ [rows, O] product that XLA:CPU hands to YNNPACK. The values are
those of ``lax.dot_general``'s gradients up to float rounding. ``vdm.models.layers``
uses it through ``dot_general`` on the CPU backend only; GPUs and TPUs keep XLA's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def dense(x, w):
    """y[..., o] = sum_c x[..., c] w[c, o]."""
    return jnp.matmul(x, w)


def _dense_fwd(x, w):
    return dense(x, w), (x, w)


def _dense_bwd(res, dy):
    x, w = res
    dx = jnp.matmul(dy, w.T)
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    dw = jnp.matmul(x_t, dy.reshape(-1, dy.shape[-1]))
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``dense`` behind the ``lax.dot_general`` signature that ``nn.Dense`` calls (``precision``
    is accepted for that signature; XLA:CPU computes float32 dots in float32 either way)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract), tuple(rhs_contract)) != ((lhs.ndim - 1,), (0,)) or lhs_batch or rhs_batch \
            or rhs.ndim != 2 or preferred_element_type is not None:
        raise ValueError(f"cpu_dense.dot_general supports only nn.Dense's x[..., C] @ w[C, O], "
                         f"got dimension_numbers={dimension_numbers} with shapes {lhs.shape} and {rhs.shape}")
    return dense(lhs, rhs)
