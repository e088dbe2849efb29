"""Why a training run went non-finite: the failing step replayed from the last good state.

``guarded_step`` (``vdm.train_step``) keeps the state of the last finite step on the
device and records the first non-finite one; ``non_finite_error`` replays that step on
its batch (a pure function of the step) and names the cause.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vdm import build
from vdm.train_step import AXIS, TrainState, batch_labels, stack_steps, train_step, update_key_and_index


def _all_finite(metrics: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in metrics.values())


def schedule_endpoints(process: build.Process, params) -> dict:
    """The log-SNR at the schedule's ends, {"t=1": ..., "t=T": ...} (discrete: the noisiest
    and least noisy steps) or {"t=0": ..., "t=1": ...} (continuous)."""
    if process.discrete:
        return {"t=1": float(process.schedule.log_snr[1]), f"t={process.T}": float(process.schedule.log_snr[process.T])}
    ends = np.asarray(process.log_snr(params, jnp.asarray([0.0, 1.0], jnp.float32)), np.float64)
    return {"t=0": float(ends[0]), "t=1": float(ends[1])}


def diagnose_non_finite(setup: build.Setup, optimizer, optim, state: TrainState, batches: dict,
                        first_step: int) -> str:
    """Why a host call of k steps (from the replicated ``state``, on ``batches``
    [devices, k, per_device, ...]) went non-finite: replays the steps one by one (``train_step``
    under ``vmap`` over the device axis, the same collectives as ``pmap``) up to the first bad
    one, and reports, with the parameters before it, the schedule's end log-SNRs, the examples
    whose loss is non-finite and their times t, the parameters whose gradient is non-finite,
    and the largest |parameter|. Suggests a lower learning rate only when the parameters
    themselves have diverged or the loss is finite and the update overflows. With several
    processes the replay sees this process's devices and examples only (an approximation)."""
    step_fn = functools.partial(train_step, objective=setup.objective, optimizer=optimizer, optim=optim)
    replay = jax.jit(jax.vmap(step_fn, axis_name=AXIS))
    state = jax.device_get(state)
    k = next(iter(batches.values())).shape[1]
    for j in range(k):
        batch = {key: v[:, j] for key, v in batches.items()}
        new_state, metrics = replay(state, batch)
        if not _all_finite(jax.device_get(metrics)):
            break
        state = new_state
    step = first_step + j
    x, labels = batch["x"], batch_labels(setup.objective, batch)

    def probe(params, x, loss_state, labels):
        key, index = update_key_and_index(state.rng[0], step, x.shape[0], optim.accum_steps)
        per_example = lambda p: setup.objective.loss(p, key, index, x, loss_state, True, labels)
        (values, aux) = per_example(params)
        grads = jax.grad(lambda p: per_example(p)[0].mean())(params)
        return values, aux["t"], grads

    values, t, grads = jax.device_get(jax.jit(jax.vmap(probe, axis_name=AXIS))(state.params, x, state.loss_state,
                                                                               labels))
    values, t = values.reshape(-1), t.reshape(-1)
    params = jax.tree.map(lambda a: a[0], state.params)
    lines = [f"non-finite {'loss' if not np.isfinite(metrics['loss']).all() else 'gradient'} at step {step + 1}"]
    ends = schedule_endpoints(setup.process, params)
    bad_ends = {n: v for n, v in ends.items() if not math.isfinite(v)}
    lines.append("schedule log-SNR at the ends: " + ", ".join(f"{n}: {v:.4g}" for n, v in ends.items()))
    bad = ~np.isfinite(values)
    if bad.any():
        lines.append(f"loss non-finite for {int(bad.sum())} of {len(values)} examples, at t in "
                     f"[{t[bad].min():.4g}, {t[bad].max():.4g}] (the batch's t span "
                     f"[{t.min():.4g}, {t.max():.4g}])")
    else:
        lines.append(f"loss finite for all {len(values)} examples (t in [{t.min():.4g}, {t.max():.4g}])")
    bad_grads = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
                 if not np.isfinite(g).all()]
    if bad_grads:
        lines.append(f"gradient non-finite in {len(bad_grads)} parameter(s): {', '.join(bad_grads[:5])}"
                     + (" ..." if len(bad_grads) > 5 else ""))
    largest = max(float(np.abs(a).max()) for a in jax.tree.leaves(params))
    lines.append(f"largest |parameter| before the step: {largest:.3g}")
    if bad_ends:
        lines.append(f"cause: the schedule's log-SNR is not finite at {', '.join(bad_ends)}; use a schedule "
                     "(config.diffusion.schedule / schedule_kwargs) with finite ends")
    elif largest > 1e4 or not (bad.any() or bad_grads):
        lines.append("cause: the parameters diverged; lower optim.lr or set optim.grad_clip")
    return "; ".join(lines)


def non_finite_error(setup: build.Setup, optimizer, optim, state: TrainState, train_ds, bad_step: int,
                     step: int, manager) -> FloatingPointError:
    """The error that stops a run whose step ``bad_step`` (0-based) went non-finite, found by the
    host at ``step``: ``state`` (replicated) is the last good state, as ``guarded_step`` kept it,
    and the failing step is replayed from it on its batch (``get_batch`` is a pure function of
    the step) by ``diagnose_non_finite``. Names the last good checkpoint, which is kept."""
    batches = stack_steps([train_ds.get_batch(bad_step)])
    manager.wait_until_finished()
    latest = manager.latest_step()
    return FloatingPointError(
        f"non-finite loss or gradient in step {bad_step + 1} (found at step {step}; the steps "
        f"from it on were skipped). " + diagnose_non_finite(setup, optimizer, optim, state, batches, bad_step)
        + ". Stopped without saving; " + (
            f"the last good checkpoint is step {latest} in {manager.directory}."
            if latest is not None else f"no checkpoint yet in {manager.directory}."))
