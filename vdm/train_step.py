"""The train step: the TrainState, the optimiser, one step and k steps per call, the eval step.

The step is written once for a shard of the global batch; its cross-device means, sums
and gathers go through a ``vdm.parallel.Reductions``, so that ``train.parallelism`` runs
it either under ``jax.pmap(axis_name="batch")`` (one device's share, ``lax.pmean``) or
as one ``jax.jit`` over a (data, fsdp) mesh (the global batch, sharded arrays,
optionally FSDP-sharded parameters). Every example draws its randomness (timestep,
noise, dropout, label dropout) from a key folded from (seed, step, global example
index), so a step gives the same result on 1, 2 or N devices, on any number of hosts
and in either mode (up to float rounding of the averages). Several steps run per host
call inside a ``lax.scan``, through ``guarded_step``: a non-finite step and every step
after it leave the state unchanged and record the step, so the host need not check
every step.

The optimiser is Optax AdamW after global-norm clipping, with linear warmup then
constant or cosine decay, optional gradient accumulation (``optax.MultiSteps``) and
an exponential moving average of the parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm import parallel
from vdm.objective import example_keys

AXIS = parallel.PMAP_AXIS


class TrainState(flax.struct.PyTreeNode):
    """Everything a checkpoint holds. ``rng`` is the run's base key (raw uint32[2]);
    ``loss_state`` is the importance sampler's loss history (an empty dict when unused)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    loss_state: Any


def initial_state(setup, optimizer, root: jax.Array) -> TrainState:
    """A run's state before its first step, as host arrays: the network's parameters drawn from
    ``fold_in(root, 0)`` (the EMA starts at them), the optimiser's state, the base key
    ``fold_in(root, 1)`` and the objective's empty loss history. ``setup``: a ``vdm.build.Setup``.
    One jitted call: the same values as running it op by op, without a compile per op."""
    def build(root):
        params = setup.init_params(jax.random.fold_in(root, 0))
        return TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=optimizer.init(params),
                          rng=jax.random.fold_in(root, 1), loss_state=setup.objective.init_loss_state())

    return jax.device_get(jax.jit(build)(root))


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_updates: int) -> optax.Schedule:
    """Linear warmup from 0 to ``optim.lr`` over ``optim.warmup_steps`` updates, then
    constant or cosine decay to ``optim.lr * optim.end_lr_factor`` at ``num_updates``."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    if optim.decay == "constant":
        after = optax.constant_schedule(optim.lr)
    else:
        after = optax.cosine_decay_schedule(optim.lr, max(num_updates - optim.warmup_steps, 1),
                                            alpha=optim.end_lr_factor)
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, AdamW with the schedule, accumulate ``optim.accum_steps`` micro-batches."""
    num_updates = num_steps // optim.accum_steps
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(optim, num_updates), b1=optim.b1, b2=optim.b2,
                    eps=optim.eps, weight_decay=optim.weight_decay),
    )
    if optim.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.accum_steps)
    return tx


def ema_decay(optim: ml_collections.ConfigDict, step) -> jax.Array:
    """EMA decay min(optim.ema_decay, (1 + n) / (10 + n)) after n updates: the warmup of
    TensorFlow's ExponentialMovingAverage(num_updates), so early averages do not keep the
    random initialisation (with 0.999 it would still weigh 37% after 1,000 steps)."""
    n = (step // optim.accum_steps).astype(jnp.float32)
    return jnp.minimum(optim.ema_decay, (1.0 + n) / (10.0 + n))


def optimizer_stepped(optimizer, opt_state) -> jax.Array:
    """True when the last ``update`` changed the parameters: with ``optax.MultiSteps``, its
    ``has_updated(state)`` (the k-th micro-batch of an update); always without accumulation."""
    if isinstance(optimizer, optax.MultiSteps):
        return optimizer.has_updated(opt_state)
    return jnp.asarray(True)


def global_example_index(per_device_batch: int, reductions: parallel.Reductions = parallel.PMAP):
    """Global indices of this shard's examples: shard d (over all hosts) holds examples
    d * per_device_batch ... (d + 1) * per_device_batch - 1 of the global batch (under the
    mesh the step sees the whole global batch: one shard)."""
    return reductions.shard_index() * per_device_batch + jnp.arange(per_device_batch)


def update_key_and_index(rng, step, per_device_batch: int, accum_steps: int,
                         reductions: parallel.Reductions = parallel.PMAP):
    """(key, index) of this shard's examples at train step ``step``.

    With accumulation over k = ``accum_steps`` micro-batches, the micro-batches of one
    update are one combined batch of k global batches: the key is folded from the update
    number step // k and micro-batch m holds examples m * B ... (m + 1) * B - 1 (B the
    global batch). An accumulated update therefore draws the same t and noise per example
    as one step over the combined batch (k = 1: key from the step, indices 0 .. B - 1).
    """
    update, micro = jnp.divmod(step, accum_steps)
    global_batch = per_device_batch * reductions.num_shards()
    return (jax.random.fold_in(rng, update),
            micro * global_batch + global_example_index(per_device_batch, reductions))


def batch_labels(objective, batch):
    """The batch's labels for a class-conditional objective, None for an unconditional one."""
    return batch["label"] if objective.num_classes else None


def train_step(state: TrainState, batch, *, objective, optimizer, optim,
               reductions: parallel.Reductions = parallel.PMAP):
    """One optimisation step on this shard of the global batch: one device's share under
    pmap (``parallel.PMAP``), the whole global batch under the mesh jit.

    The loss is the mean over the global batch of per-example losses; gradients
    and metrics are averaged over devices with ``reductions.mean`` (``lax.pmean`` under
    pmap). The importance sampler's history (if any) is updated with the losses of the
    whole global batch, gathered in global example order.
    """
    x, labels = batch["x"], batch_labels(objective, batch)
    key, index = update_key_and_index(state.rng, state.step, x.shape[0], optim.accum_steps, reductions)

    def mean_loss(params):
        per_example, aux = objective.loss(params, key, index, x, state.loss_state, True, labels)
        return per_example.mean(), aux

    (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    grads = reductions.shard_grads(reductions.mean(grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_rate = jnp.where(optimizer_stepped(optimizer, opt_state), 1.0 - ema_decay(optim, state.step), 0.0)
    ema_params = optax.incremental_update(params, state.ema_params, ema_rate)
    loss_state = objective.update_loss_state(state.loss_state, reductions.gather(aux))
    metrics = {"loss": reductions.mean(loss), "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, loss_state=loss_state)
    return new_state, metrics


def guarded_step(carry, batch, *, step: Callable):
    """``step`` (``train_step`` with its options bound) that keeps the state when it goes
    non-finite. ``carry`` is (state, bad): bad is -1 while every step was finite, else the
    0-based number of the first step whose loss or gradient norm was not finite (the loop's
    check, made on the device). From that step on the state is left as it was, so when the
    host reads ``bad`` the state is the last good one."""
    state, bad = carry
    new_state, metrics = step(state, batch)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = finite & (bad < 0)
    bad = jnp.where((bad < 0) & ~finite, state.step, bad)
    state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
    return (state, bad), metrics


def multi_step(reductions: parallel.Reductions, *, objective, optimizer, optim, guard: bool = True) -> Callable:
    """k train steps in one ``lax.scan`` with the given cross-device ``reductions``: with ``guard``
    ``(state, batches, bad) -> (state, metrics, bad)`` through ``guarded_step``, else
    ``(state, batches) -> (state, metrics)``; batches carry a leading k axis, and so do the metrics."""
    step = functools.partial(train_step, objective=objective, optimizer=optimizer, optim=optim,
                             reductions=reductions)
    if not guard:
        return lambda state, batches: jax.lax.scan(step, state, batches)

    def guarded(state, batches, bad):
        (state, bad), metrics = jax.lax.scan(functools.partial(guarded_step, step=step), (state, bad), batches)
        return state, metrics, bad

    return guarded


def make_p_train(objective, optimizer, optim, guard: bool = False) -> Callable:
    """``multi_step`` under ``jax.pmap`` over the local devices: the state replicated, batches
    [devices, k, per_device, ...], metrics [devices, k] (``bad``: int32 per device)."""
    return jax.pmap(multi_step(parallel.PMAP, objective=objective, optimizer=optimizer, optim=optim, guard=guard),
                    axis_name=AXIS)


def make_runner(train_cfg: ml_collections.ConfigDict, objective, optimizer, optim, state_template):
    """The ``vdm.parallel`` runner ``train_cfg.parallelism`` names ("pmap" or "mesh"), over all
    devices of all processes, running the guarded ``multi_step`` and ``eval_step``."""
    def steps(reductions):
        return multi_step(reductions, objective=objective, optimizer=optimizer, optim=optim)

    def evals(reductions):
        return functools.partial(eval_step, objective=objective, reductions=reductions)

    return parallel.make_runner(train_cfg, steps, evals, state_template)


def eval_step(params, loss_state, batch, rng, batch_index, *, objective,
              reductions: parallel.Reductions = parallel.PMAP):
    """Sums over one eval batch of the held-out loss and of the -ELBO estimate (bits/dim),
    over the real examples (``batch["mask"]``), with per-example keys as in training."""
    x, mask, labels = batch["x"], batch["mask"], batch_labels(objective, batch)
    key, index = jax.random.fold_in(rng, batch_index), global_example_index(x.shape[0], reductions)
    loss, _ = objective.loss(params, key, index, x, loss_state, False, labels)
    bpd = jax.vmap(objective.nelbo_bpd, in_axes=(None, 0, 0, 0))(params, example_keys(key, index), x, labels)
    sums = {"eval_loss": jnp.sum(loss * mask), "eval_bpd": jnp.sum(bpd * mask), "count": jnp.sum(mask)}
    return reductions.sum(sums)


def stack_steps(batches: list[dict]) -> dict:
    """k batches of [devices, per_device, ...] -> one of [devices, k, per_device, ...]."""
    return {key: np.stack([b[key] for b in batches], axis=1) for key in batches[0]}
