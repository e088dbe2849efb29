"""The scan driver: runs a step function over a grid's levels with ``lax.scan``, optionally
keeping a trajectory, with per-example noise drawn from per-example keys."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vdm.samplers.grids import Grid, check_int


def grid_plan(grid: Grid) -> dict:
    """Per-step scan inputs: step index i, current/next model time t/s and log-SNR."""
    n = grid.times.shape[0] - 1
    return dict(i=jnp.arange(n), t=grid.times[:-1], s=grid.times[1:],
                lam_t=grid.log_snr[:-1], lam_s=grid.log_snr[1:])


class Trajectory(NamedTuple):
    """The state x_s (VP units) and the prediction x0_hat after every k-th step and the last:
    ``times[j]`` is the level x[j] sits at; x and x0 have shape [n_records, *x.shape]."""

    times: jax.Array
    x: jax.Array
    x0: jax.Array


def example_normal(keys, x, i, j=None):
    """Per-example standard normals shaped like x: example b uses fold_in(keys[b], i) (then j)."""
    def one(k):
        k = jax.random.fold_in(k, i)
        return jax.random.normal(k if j is None else jax.random.fold_in(k, j), x.shape[1:], x.dtype)
    return jax.vmap(one)(keys)


def drive(step, x, plan: dict, grid: Grid, every: int | None, state=None):
    """Run ``step(x, inputs) -> (x, x0_hat)`` over the leading axis of ``plan`` with lax.scan.

    With ``every`` = k the steps run in chunks of k (an outer scan over an inner
    one, the last chunk padded with no-op steps) and the state after each chunk
    is kept; without it nothing per step is kept, so memory does not grow with
    the number of steps. A multistep solver passes its memory as ``state`` (a
    pytree); the carry is then (x, state) and ``step((x, state), inputs) ->
    ((x, state), x0_hat)``. Returns (x, Trajectory or None).
    """
    first = (lambda c: c) if state is None else (lambda c: c[0])
    x_init = x
    x = x if state is None else (x, state)
    if every is None:
        x, _ = lax.scan(lambda c, inp: (step(c, inp)[0], None), x, plan)
        return first(x), None
    n = grid.times.shape[0] - 1
    n_rec = -(-n // every)
    idx = np.minimum(np.arange(n_rec * every), n - 1)
    chunks = jax.tree.map(lambda a: a[idx].reshape((n_rec, every) + a.shape[1:]), plan)
    valid = (np.arange(n_rec * every) < n).reshape(n_rec, every)

    def inner(carry, inputs):
        inp, ok = inputs
        x_new, x0_new = step(carry[0], inp)
        keep = jax.tree.map(lambda a, b: jnp.where(ok, a, b), x_new, carry[0])
        return (keep, jnp.where(ok, x0_new, carry[1])), None

    def outer(carry, chunk):
        carry, _ = lax.scan(inner, carry, chunk)
        return carry, (first(carry[0]), carry[1])

    (x, _), (xs, x0s) = lax.scan(outer, (x, jnp.zeros_like(x_init)), (chunks, valid))
    times = grid.times[np.minimum(np.arange(1, n_rec + 1) * every, n)]
    return first(x), Trajectory(times, xs, x0s)


def check_every(every):
    if every is not None:
        check_int("trajectory_every", every, 1)
