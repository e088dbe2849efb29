"""Training: the loop that runs ``vdm.train_step`` over a config's data, evaluating,
sampling and checkpointing as it goes.

The loop never waits for the device between steps: a thread (``vdm.prefetch``) makes
the batches of the next ``train.prefetch`` host calls and puts them on the devices
while the current call runs; metrics stay on the devices until a log step; and the
step itself checks that its loss and gradient norm are finite (``guarded_step``),
which the host reads when it reads results anyway (log, eval and checkpoint steps).
A non-finite run stops with a diagnosis replayed from the last good state
(``vdm.diagnose``) and the last good checkpoint kept.

The config is turned into the process, network, objective and sampler by
``vdm.build``. Checkpoints go through ``vdm.checkpoints`` (an Orbax
``CheckpointManager``: async, atomic) and hold the whole TrainState (under the mesh
as sharded arrays, restorable on another mesh); the data position is the step, so a
rerun in the same workdir continues exactly where the last checkpoint left off.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers

from vdm import baselines
from vdm import build
from vdm import checkpoints
from vdm import config as config_lib
from vdm import data as data_lib
from vdm import diagnose
from vdm import prefetch
from vdm import viz
from vdm.train_step import TrainState, initial_state, make_optimizer, make_runner, stack_steps

# Host calls dispatched ahead of the one the host waits for: enough to keep the device busy
# while the host dispatches the next, few enough to bound the batches held on the devices.
MAX_CALLS_IN_FLIGHT = 2


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


class MetricLog:
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


@dataclasses.dataclass
class Run:
    """What one training run holds while the loop runs."""

    config: ml_collections.ConfigDict
    workdir: str
    train_ds: Any
    eval_ds: Any
    setup: build.Setup
    optimizer: Any
    manager: ocp.CheckpointManager
    runner: Any            # a vdm.parallel runner
    log: MetricLog
    baseline: dict | None  # the per-pixel categorical bound of the split (image data)
    eval_rng: jax.Array
    sample_rng: jax.Array

    def close(self) -> None:
        self.train_ds.close()
        self.eval_ds.close()


def open_run(config: ml_collections.ConfigDict, workdir: str):
    """(Run, state on the devices, its step): the data, the setup, the optimiser and the
    state restored from the workdir's latest checkpoint (or initialised from the seed)."""
    train, chief = config.train, jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    train_ds = data_lib.build_dataset(config.data, split="train", global_batch_size=train.batch_size,
                                      seed=config.seed)
    eval_ds = data_lib.build_dataset(config.data, split="test", global_batch_size=config.eval.batch_size,
                                     seed=config.seed)
    setup = build.build_setup(config, train_ds)
    optimizer = make_optimizer(config.optim, train.num_steps)
    root = jax.random.PRNGKey(config.seed)
    init = initial_state(setup, optimizer, root)
    manager = checkpoints.checkpoint_manager(workdir, train)
    runner = make_runner(train, setup.objective, optimizer, config.optim, init)
    state = runner.place_state(checkpoints.restore_or_init(manager, init, runner.restore_target(init)))
    # The best factorized model of the split (per-pixel categorical), beside the -ELBO in the log.
    baseline = (baselines.reference_bpd(train_ds.iterate_epoch(config.eval.batch_size),
                                        eval_ds.iterate_epoch(config.eval.batch_size))
                if len(train_ds.data_shape) == 3 and jax.process_count() == 1 else None)
    run = Run(config, workdir, train_ds, eval_ds, setup, optimizer, manager, runner, MetricLog(workdir, chief),
              baseline, jax.random.fold_in(root, 2), jax.random.fold_in(root, 3))
    return run, state, int(runner.host(state.step))


class Progress:
    """The console's progress line: steps/s since the last log step, not counting evaluation."""

    def __init__(self, step: int):
        self.tick, self.tick_step, self.last_bpd = time.time(), step, "-"

    def log(self, run: Run, step: int, metrics) -> None:
        now = time.time()
        rate = (step - self.tick_step) / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, step
        scalars = {key: float(np.mean(v)) for key, v in run.runner.host_metrics(metrics).items()}
        run.log.write(step, {**scalars, "steps_per_sec": rate})
        run.log.console(f"step {step}/{run.config.train.num_steps} | loss {scalars['loss']:.4f} | "
                        f"eval bpd {self.last_bpd} | {rate:.1f} steps/s")

    def restart(self) -> None:
        self.tick = time.time()


def evaluate_and_sample(run: Run, state, step: int) -> dict:
    """The held-out loss and -ELBO with the EMA parameters (and the per-pixel baseline),
    logged; process 0 writes a sample grid. Returns the scores."""
    config = run.config
    scores = evaluate(run.runner.eval_sums, state.ema_params, state.loss_state, run.eval_ds, run.eval_rng,
                      config.eval)
    if run.baseline is not None:
        scores["pixel_baseline_bpd"] = run.baseline["mean"]
    run.log.write(step, scores)
    run.log.console(f"eval at step {step}: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()))
    if config.sample.num_samples > 0:
        samples = run.runner.draw(run.setup.sample, state.ema_params, jax.random.fold_in(run.sample_rng, step),
                                  config.sample.num_samples)
        if run.log.chief:
            path = write_samples(os.path.join(run.workdir, "samples", f"step_{step:07d}.png"), samples)
            bad = int(np.sum(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)))
            run.log.console(f"samples written to {path}"
                            + (f" ({bad} of {len(samples)} samples not finite, left out)" if bad else ""))
    return scores


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train per ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluate
    periodically, and return the final state (host arrays).

    Writes in ``workdir``: checkpoints/ (Orbax), metrics.jsonl, TensorBoard event
    files, samples/step_<N>.png, and config.json.
    """
    config_lib.validate(config)
    train = config.train
    run, state, step = open_run(config, workdir)
    runner, k = run.runner, train.steps_per_call
    run.log.console(f"{'resumed from' if step else 'starting at'} step {step}; "
                    f"{jax.process_count()} process(es), {jax.device_count()} device(s), "
                    f"global batch {train.batch_size}, parallelism {runner.name}"
                    + (f" (mesh {dict(runner.mesh.shape)})" if runner.name == "mesh" else ""))
    progress, bad = Progress(step), runner.flag(-1)  # bad: the first non-finite step, found on the device
    ahead = prefetch.Prefetcher(
        lambda first: runner.place_batches(stack_steps([run.train_ds.get_batch(first + j) for j in range(k)])),
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
            log_now, eval_now = step % train.log_every == 0 or done, step % config.eval.every == 0 or done
            save_now = step % train.checkpoint_every == 0 or done
            if (log_now or eval_now or save_now) and runner.read_flag(bad) >= 0:  # the host reads results here
                ahead.close()
                raise diagnose.non_finite_error(run.setup, run.optimizer, config.optim,
                                                runner.replicated_host_state(state), run.train_ds,
                                                runner.read_flag(bad), step, run.manager)
            if log_now:
                progress.log(run, step, metrics)
            if eval_now:
                progress.last_bpd = f"{evaluate_and_sample(run, state, step)['eval_bpd']:.3f}"
                progress.restart()
            if save_now:
                run.manager.save(step, args=ocp.args.StandardSave(runner.checkpoint_view(state)))
                run.log.console(f"checkpoint step {step} saving")
    finally:
        ahead.close()
        run.close()
    run.manager.wait_until_finished()
    run.manager.close()
    run.log.close()
    return runner.host(state)
