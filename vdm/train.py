"""Training: the TrainState, the optimiser, the train step, evaluation, the loop.

The train step is written once for a shard of the global batch; its cross-device
means, sums and gathers go through a ``vdm.parallel.Reductions``, so that
``train.parallelism`` runs it either under ``jax.pmap(axis_name="batch")`` (one
device's share, ``lax.pmean``) or as one ``jax.jit`` over a (data, fsdp) mesh (the
global batch, sharded arrays, optionally FSDP-sharded parameters). Every example
draws its randomness (timestep, noise, dropout) from a key folded from (seed, step,
global example index), so a step gives the same result on 1, 2 or N devices, on any
number of hosts and in either mode (up to float rounding of the averages). Several
steps can run per host call inside a ``lax.scan``.

The loop never waits for the device between steps: a thread (``vdm.prefetch``) makes
the batches of the next ``train.prefetch`` host calls and puts them on the devices
while the current call runs; metrics stay on the devices until a log step; and the
step itself checks that its loss and gradient norm are finite (``guarded_step``): a
non-finite step and every step after it leave the state unchanged and record the step,
which the host reads when it reads results anyway (log, eval and checkpoint steps).
It then stops, as before, with a diagnosis replayed from the last good state and the
last good checkpoint kept.

The optimiser is Optax AdamW after global-norm clipping, with linear warmup
then constant or cosine decay, optional gradient accumulation
(``optax.MultiSteps``) and an exponential moving average of the parameters.
The config is turned into the process, network, objective and sampler by
``vdm.build``. Checkpoints go through ``vdm.checkpoints`` (an Orbax
``CheckpointManager``: async, atomic) and hold the whole TrainState (under the mesh
as sharded arrays, restorable on another mesh); the data position is the step, so a
rerun in the same workdir continues exactly where the last checkpoint left off.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers

from vdm import baselines
from vdm import build
from vdm import checkpoints
from vdm import config as config_lib
from vdm import data as data_lib
from vdm import parallel
from vdm import prefetch
from vdm import viz

AXIS = parallel.PMAP_AXIS


# ---------------------------------------------------------------------------
# State and optimiser.
# ---------------------------------------------------------------------------


class TrainState(flax.struct.PyTreeNode):
    """Everything a checkpoint holds. ``rng`` is the run's base key (raw uint32[2]);
    ``loss_state`` is the importance sampler's loss history (an empty dict when unused)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    loss_state: Any


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


# ---------------------------------------------------------------------------
# The per-device train step.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Evaluation with the EMA parameters.
# ---------------------------------------------------------------------------


def eval_step(params, loss_state, batch, rng, batch_index, *, objective,
              reductions: parallel.Reductions = parallel.PMAP):
    """Sums over one eval batch of the held-out loss and of the -ELBO estimate (bits/dim),
    over the real examples (``batch["mask"]``), with per-example keys as in training."""
    x, mask, labels = batch["x"], batch["mask"], batch_labels(objective, batch)
    key, index = jax.random.fold_in(rng, batch_index), global_example_index(x.shape[0], reductions)
    loss, _ = objective.loss(params, key, index, x, loss_state, False, labels)
    bpd = jax.vmap(objective.nelbo_bpd, in_axes=(None, 0, 0, 0))(params, build.example_keys(key, index), x, labels)
    sums = {"eval_loss": jnp.sum(loss * mask), "eval_bpd": jnp.sum(bpd * mask), "count": jnp.sum(mask)}
    return reductions.sum(sums)


def evaluate(eval_sums, ema_params, loss_state, eval_ds, rng, eval_cfg) -> dict:
    """Means over the held-out split (its first ``eval_cfg.num_batches`` batches; 0 = all);
    ``eval_sums`` is a runner's (``vdm.parallel``): one batch's sums as Python floats."""
    totals = {}
    for i, batch in enumerate(eval_ds.iterate_epoch(eval_cfg.batch_size)):
        if eval_cfg.num_batches and i >= eval_cfg.num_batches:
            break
        sums = eval_sums(ema_params, loss_state, batch, rng, np.int32(i))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def write_samples(path: str, samples: np.ndarray) -> str:
    """Write samples as a PNG: an image grid ([N, H, W, C]), a 1-D histogram or a 2-D scatter
    plot of the finite samples; other vector data ([N, D], D > 2, or more axes), or samples
    none of which is finite, go to an .npz of the same name."""
    finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
    if samples.ndim == 4:
        return viz.save_image_grid(path, np.nan_to_num(samples), scale=viz.display_scale(samples.shape[1]))
    if samples.shape[1:] == (1,) and finite.any():
        return viz.plot_1d_samples(path, samples[finite, 0])
    if samples.shape[1:] == (2,) and finite.any():
        return viz.plot_2d_samples(path, samples[finite])
    path = os.path.splitext(path)[0] + ".npz"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, samples=samples)
    return path


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def setup_distributed(train: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` when ``train.distributed`` (call before any other JAX use).

    On managed clusters (Cloud TPU, SLURM, ...) JAX finds the coordinator itself;
    elsewhere set ``train.coordinator_address``, ``num_processes`` and ``process_id``.
    """
    config_lib.validate_distributed(train)
    if not train.distributed:
        return
    kwargs = {}
    if train.coordinator_address:
        kwargs = dict(coordinator_address=train.coordinator_address,
                      num_processes=train.num_processes, process_id=train.process_id)
    jax.distributed.initialize(**kwargs)


def _stack_steps(batches: list[dict]) -> dict:
    """k batches of [devices, per_device, ...] -> one of [devices, k, per_device, ...]."""
    return {key: np.stack([b[key] for b in batches], axis=1) for key in batches[0]}


# Host calls dispatched ahead of the one the host waits for: enough to keep the device busy
# while the host dispatches the next, few enough to bound the batches held on the devices.
MAX_CALLS_IN_FLIGHT = 2


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
    batches = _stack_steps([train_ds.get_batch(bad_step)])
    manager.wait_until_finished()
    latest = manager.latest_step()
    return FloatingPointError(
        f"non-finite loss or gradient in step {bad_step + 1} (found at step {step}; the steps "
        f"from it on were skipped). " + diagnose_non_finite(setup, optimizer, optim, state, batches, bad_step)
        + ". Stopped without saving; " + (
            f"the last good checkpoint is step {latest} in {manager.directory}."
            if latest is not None else f"no checkpoint yet in {manager.directory}."))


class _Log:
    """Process 0's outputs: clu metric writer (TensorBoard + logging), metrics.jsonl, console."""

    def __init__(self, workdir: str, chief: bool):
        self.chief = chief
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not chief)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if chief else None

    def write(self, step: int, metrics: dict) -> None:
        self.writer.write_scalars(step, metrics)
        if self.chief:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()

    def console(self, line: str) -> None:
        if self.chief:
            print(line, flush=True)

    def close(self) -> None:
        self.writer.flush()
        if self.chief:
            self.jsonl.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train per ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluate
    periodically, and return the final state (host arrays).

    Writes in ``workdir``: checkpoints/ (Orbax), metrics.jsonl, TensorBoard event
    files, samples/step_<N>.png, and config.json.
    """
    config_lib.validate(config)
    train, optim = config.train, config.optim
    chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_ds = data_lib.build_dataset(config.data, split="train", global_batch_size=train.batch_size,
                                      seed=config.seed)
    eval_ds = data_lib.build_dataset(config.data, split="test", global_batch_size=config.eval.batch_size,
                                     seed=config.seed)
    setup = build.build_setup(config, train_ds)
    optimizer = make_optimizer(optim, train.num_steps)

    root = jax.random.PRNGKey(config.seed)
    params = setup.init_params(jax.random.fold_in(root, 0))
    init = jax.device_get(TrainState(
        step=jnp.int32(0), params=params, ema_params=params, opt_state=optimizer.init(params),
        rng=jax.random.fold_in(root, 1), loss_state=setup.objective.init_loss_state()))
    eval_rng, sample_rng = jax.random.fold_in(root, 2), jax.random.fold_in(root, 3)

    manager = checkpoints.checkpoint_manager(workdir, train)
    runner = make_runner(train, setup.objective, optimizer, optim, init)
    state = runner.place_state(checkpoints.restore_or_init(manager, init, runner.restore_target(init)))
    step = int(runner.host(state.step))
    log = _Log(workdir, chief)
    log.console(f"{'resumed from' if step else 'starting at'} step {step}; "
                f"{jax.process_count()} process(es), {jax.device_count()} device(s), "
                f"global batch {train.batch_size}, parallelism {runner.name}"
                + (f" (mesh {dict(runner.mesh.shape)})" if runner.name == "mesh" else ""))
    # The best factorized model of the split (per-pixel categorical), beside the -ELBO in the log.
    baseline = (baselines.reference_bpd(train_ds.iterate_epoch(config.eval.batch_size),
                                        eval_ds.iterate_epoch(config.eval.batch_size))
                if len(train_ds.data_shape) == 3 and jax.process_count() == 1 else None)
    k = train.steps_per_call
    last_bpd = "-"  # the test -ELBO of the last evaluation, shown on the progress line
    tick, tick_step = time.time(), step
    bad = runner.flag(-1)  # the first non-finite step, found on the device
    ahead = prefetch.Prefetcher(
        lambda first: runner.place_batches(_stack_steps([train_ds.get_batch(first + j) for j in range(k)])),
        range(step, train.num_steps, k), train.prefetch)
    in_flight = collections.deque()  # the `bad` outputs of calls dispatched and maybe not finished
    try:
        for first, batches in ahead:
            state, metrics, bad = runner.train(state, batches, bad)
            step = first + k
            in_flight.append(bad)
            if len(in_flight) > MAX_CALLS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            done = step == train.num_steps
            log_now = step % train.log_every == 0 or done
            eval_now = step % config.eval.every == 0 or done
            save_now = step % train.checkpoint_every == 0 or done
            if log_now or eval_now or save_now:  # the host reads results here: check the run is finite
                first_bad = runner.read_flag(bad)
                if first_bad >= 0:
                    ahead.close()
                    raise non_finite_error(setup, optimizer, optim, runner.replicated_host_state(state), train_ds,
                                           first_bad, step, manager)
            if log_now:
                now = time.time()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                scalars = {key: float(np.mean(v)) for key, v in runner.host_metrics(metrics).items()}
                log.write(step, {**scalars, "steps_per_sec": rate})
                log.console(f"step {step}/{train.num_steps} | loss {scalars['loss']:.4f} | "
                            f"eval bpd {last_bpd} | {rate:.1f} steps/s")
            if eval_now:
                scores = evaluate(runner.eval_sums, state.ema_params, state.loss_state, eval_ds, eval_rng,
                                  config.eval)
                if baseline is not None:
                    scores["pixel_baseline_bpd"] = baseline["mean"]
                last_bpd = f"{scores['eval_bpd']:.3f}"
                log.write(step, scores)
                log.console(f"eval at step {step}: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()))
                ema_params = runner.host(state.ema_params) if config.sample.num_samples > 0 else None
                if chief and config.sample.num_samples > 0:
                    samples = np.asarray(setup.sample(ema_params, jax.random.fold_in(sample_rng, step)))
                    path = write_samples(os.path.join(workdir, "samples", f"step_{step:07d}.png"), samples)
                    bad_samples = int(np.sum(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)))
                    log.console(f"samples written to {path}" + (
                        f" ({bad_samples} of {len(samples)} samples not finite, left out)" if bad_samples else ""))
                tick = time.time()  # do not count evaluation in steps/s
            if save_now:
                manager.save(step, args=ocp.args.StandardSave(runner.checkpoint_view(state)))
                log.console(f"checkpoint step {step} saving")
    finally:
        ahead.close()
        train_ds.close()
        eval_ds.close()
    manager.wait_until_finished()
    manager.close()
    log.close()
    return runner.host(state)
