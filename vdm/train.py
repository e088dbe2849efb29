"""Training: the TrainState, the pmapped train step, evaluation, checkpoints, the loop.

The per-device step is written for one device's share of the global batch and
wrapped in ``jax.pmap(axis_name="batch")``; gradients and metrics are averaged
with ``lax.pmean``. Every example draws its randomness (timestep, noise,
dropout) from a key folded from (seed, step, global example index), so a step
gives the same result on 1, 2 or N devices and on any number of hosts (up to
float rounding of the averages). Several steps can run per host call inside a
``lax.scan``.

The optimiser is Optax AdamW after global-norm clipping, with linear warmup
then constant or cosine decay, optional gradient accumulation
(``optax.MultiSteps``) and an exponential moving average of the parameters.
Checkpoints go through an Orbax ``CheckpointManager`` (async, atomic: a step
directory appears only once it is complete) and hold the whole TrainState;
the data position is the step, so a rerun in the same workdir continues
exactly where the last checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers

from vdm import config as config_lib
from vdm import data as data_lib
from vdm import diffusion
from vdm import losses
from vdm import models
from vdm import samplers
from vdm import schedules
from vdm import viz

AXIS = "batch"


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


def optimizer_stepped(optim: ml_collections.ConfigDict, opt_state) -> jax.Array:
    """True when the last ``update`` changed the parameters (always, without accumulation)."""
    if optim.accum_steps > 1:
        return optax.MultiSteps.has_updated(opt_state)
    return jnp.asarray(True)


# ---------------------------------------------------------------------------
# The network as the model function of losses and samplers.
# ---------------------------------------------------------------------------


class Process(NamedTuple):
    """The noise process of a config.

    ``log_snr(params, t)`` maps the loss's/sampler's own time variable (int32
    1..T for a discrete schedule, float32 in [0, 1] for a continuous one) to the
    log-SNR; with a learned schedule it reads ``params["schedule"]``.
    ``schedule`` is the DiscreteSchedule (None in continuous time) and
    ``schedule_net`` the LearnedLogSNR module (None unless learned).
    """

    discrete: bool
    T: int
    schedule: Any
    schedule_net: Any
    log_snr: Callable


def build_process(diffusion_cfg: ml_collections.ConfigDict) -> Process:
    d = diffusion_cfg
    kwargs = dict(d.schedule_kwargs)
    if d.time == "discrete":
        table = schedules.discrete_schedule(d.schedule, d.T, **kwargs)
        return Process(True, d.T, table, None, lambda params, t: table.log_snr[t])
    if d.schedule == "learned":
        net = models.LearnedLogSNR(**kwargs)
        return Process(False, d.T, None, net, lambda params, t: net.apply({"params": params["schedule"]}, t))
    fn = schedules.continuous_schedule(d.schedule, **kwargs)
    return Process(False, d.T, None, None, lambda params, t: fn(t))


def network_time_range(diffusion_cfg: ml_collections.ConfigDict, process: Process) -> tuple[float, float]:
    """The pair of conditioning values the network maps to 0 and 1 (its ``time_range``).

    ``time_input = "t"``: the time variable itself, (0, T) for integer steps or
    (0, 1) in continuous time; ``"log_snr"``: the log-SNR at the two ends of the
    schedule (t = 1 and T for a discrete one; a learned schedule's initial
    endpoints), i.e. VDM's normalised gamma (Kingma et al. 2021, App. B).
    """
    if diffusion_cfg.time_input == "t":
        return (0.0, float(process.T)) if process.discrete else (0.0, 1.0)
    if process.discrete:
        return float(process.schedule.log_snr[1]), float(process.schedule.log_snr[process.T])
    if process.schedule_net is not None:
        return float(process.schedule_net.log_snr_max), float(process.schedule_net.log_snr_min)
    fn = schedules.continuous_schedule(diffusion_cfg.schedule, **dict(diffusion_cfg.schedule_kwargs))
    return float(fn(0.0)), float(fn(1.0))


def build_network(config: ml_collections.ConfigDict, process: Process, data_shape) -> Any:
    """The config's network with ``time_range`` set from the diffusion section."""
    fields = config.model.to_dict()
    if "time_range" in {f.name for f in dataclasses.fields(models.NETWORKS[fields["name"]])}:
        fields["time_range"] = network_time_range(config.diffusion, process)
    return models.build_model(fields, data_shape,
                              learned_variance=diffusion.learns_variance(config.diffusion.variance))


def make_model_fn(network, process: Process, time_input: str, params, *, train: bool = False,
                  dropout_key=None) -> Callable:
    """The network as ``model_fn(x_t, t) -> output`` (DESIGN.md, model interface): the loss's
    or sampler's t is passed on as is (``time_input = "t"``) or as its log-SNR."""
    rngs = {"dropout": dropout_key} if dropout_key is not None else None

    def model_fn(x_t, t):
        s = process.log_snr(params, t) if time_input == "log_snr" else t
        return network.apply({"params": params["net"]}, x_t, s, train=train, rngs=rngs)

    return model_fn


# ---------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 1/phi: frac(u + i/phi) is a low-discrepancy sequence in i


def example_keys(key, index):
    """One key per example, folded from the step's key and the example's global index, so an
    example's randomness does not depend on which device or host processes it."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def example_normal(keys, x):
    """eps_i ~ N(0, I) with x_i's shape, each from its own key."""
    return jax.vmap(lambda k, xi: jax.random.normal(k, xi.shape, xi.dtype))(keys, x)


def low_discrepancy_times(key, index):
    """u_i = frac(u + i / phi), u ~ U(0, 1) per step: evenly spread times over the global batch
    for any batch size or device split (the Kronecker sequence; Kingma et al. 2021, App. I.1,
    spread u + i/B the same way)."""
    return jnp.mod(jax.random.uniform(key, ()) + index.astype(jnp.float32) * GOLDEN, 1.0)


class Objective(NamedTuple):
    """The training objective of a config, on one device's share of a batch.

    loss(params, key, index, x, loss_state, train) -> (per-example loss [b], aux): ``key``
      is the step's key (the same on every device), ``index`` [b] the examples' global
      indices, from which every random draw (t, noise) is folded;
    nelbo_bpd(params, key, x) -> an estimate of -ELBO(x) in bits/dim for one example x;
    init_loss_state() -> the importance sampler's LossHistory ({} when unused);
    update_loss_state(loss_state, aux) -> the history after a step, from the aux of the
      whole global batch.
    """

    loss: Callable
    nelbo_bpd: Callable
    init_loss_state: Callable
    update_loss_state: Callable


def decoder_for(loss_cfg: ml_collections.ConfigDict, discrete_8bit: bool) -> str:
    """``loss.decoder``, with "auto" resolved from the data: 8-bit data get the discretized
    Gaussian (discrete time) or VDM's categorical decoder (continuous), real data a Gaussian."""
    if loss_cfg.decoder != "auto":
        return loss_cfg.decoder
    if not discrete_8bit:
        return "gaussian"
    return "discretized" if loss_cfg.name in losses.LOSS_KINDS else "categorical"


def build_objective(config: ml_collections.ConfigDict, network, process: Process, *,
                    discrete_8bit: bool) -> Objective:
    """The loss of ``config.loss`` from ``vdm.losses`` and the ELBO estimate of ``config.eval``.

    Timesteps and noise are drawn here per example and handed to the loss. Dropout
    masks come from one key per device (Flax draws a mask per batch), so with dropout
    a step matches across device counts in distribution only.
    """
    d, lc, ev = config.diffusion, config.loss, config.eval
    decoder = decoder_for(lc, discrete_8bit)
    importance = process.discrete and lc.importance_sampling

    def model_fn(params, key, train):
        return make_model_fn(network, process, d.time_input, params, train=train,
                             dropout_key=key if train else None)

    def split(key, index):
        """Per-example keys for (t, eps, eps_0) and one device key for dropout."""
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, index))
        return keys[:, 0], keys[:, 1], keys[:, 2], jax.random.fold_in(keys[0, 0], 1)

    if process.discrete:
        common = dict(parameterization=d.parameterization, variance_type=d.variance, decoder=decoder)

        def loss(params, key, index, x, loss_state, train):
            k_t, k_eps, _, k_drop = split(key, index)
            if importance:
                t, w = jax.vmap(lambda k: losses.loss_history_sample(loss_state, k, 1))(k_t)
                t, w = t[:, 0], w[:, 0]
            else:
                t = jax.vmap(lambda k: jax.random.randint(k, (), 1, process.T + 1))(k_t)
                w = None
            values, metrics = losses.discrete_loss(
                model_fn(params, k_drop, train), k_drop, x, process.schedule, kind=lc.name,
                loss_type=lc.loss_type, weighting=lc.weighting, target=lc.target or None,
                snr_gamma=lc.snr_gamma, hybrid_lambda=lc.hybrid_lambda, t=t, weights=w,
                eps=example_normal(k_eps, x), **common)
            return values, ({"t": metrics["t"], "vlb_term": metrics["vlb_term"]} if importance else {})

        def nelbo_nats(params, key, x):
            fn = model_fn(params, None, False)
            if ev.elbo == "exact":
                return losses.discrete_elbo(fn, key, x[None], process.schedule, chunk=ev.elbo_chunk,
                                            **common)["total"][0]
            return losses.discrete_elbo_mc(fn, key, x[None], process.schedule, ev.elbo_samples,
                                           **common)["total"][0]
    else:
        common = dict(T=d.T, parameterization=d.parameterization, decoder=decoder,
                      schedule_gradient=lc.schedule_gradient)

        def vdm_nats(params, key, index, x, train):
            k_t, k_eps, k_eps0, k_drop = split(key, index)
            u = (low_discrepancy_times(key, index) if lc.antithetic
                 else jax.vmap(lambda k: jax.random.uniform(k, ()))(k_t))
            fixed_ends = ({**params, "schedule": models.schedule_net.stop_endpoint_gradients(params["schedule"])}
                          if "schedule" in params else params)
            total, _ = losses.vdm_loss(model_fn(params, k_drop, train),
                                       lambda t: process.log_snr(params, t), k_drop, x,
                                       u=u, eps=example_normal(k_eps, x), eps_0=example_normal(k_eps0, x),
                                       shape_log_snr_fn=lambda t: process.log_snr(fixed_ends, t), **common)
            return total

        def loss(params, key, index, x, loss_state, train):
            return losses.bits_per_dim(vdm_nats(params, key, index, x, train), math.prod(x.shape[1:])), {}

        def nelbo_nats(params, key, x):
            index = jnp.arange(ev.elbo_samples)
            return jnp.mean(vdm_nats(params, key, index, jnp.broadcast_to(x, (ev.elbo_samples,) + x.shape),
                                     False))

    def nelbo_bpd(params, key, x):
        return losses.bits_per_dim(nelbo_nats(params, key, x), x.size)

    if importance:
        init = lambda: losses.loss_history_init(process.T, lc.history)
        update = lambda s, aux: losses.loss_history_update(s, aux["t"], aux["vlb_term"])
    else:
        init, update = dict, lambda s, aux: s
    return Objective(loss, nelbo_bpd, init, update)


def build_sampler(config: ml_collections.ConfigDict, network, process: Process, data_shape) -> Callable:
    """``sample(params, key) -> config.sample.num_samples`` samples with ``vdm.samplers.sample``;
    x0 predictions are clipped to [-1, 1] for image data when ``sample.clip_x0``."""
    s, d = config.sample, config.diffusion
    clip = (-1.0, 1.0) if s.clip_x0 and len(data_shape) == 3 else None

    def sample(params, key):
        levels = (dict(schedule=process.schedule) if process.discrete
                  else dict(log_snr_fn=lambda t: process.log_snr(params, t)))
        return samplers.sample(make_model_fn(network, process, d.time_input, params), key,
                               (s.num_samples,) + tuple(data_shape), sampler=s.sampler,
                               num_steps=s.num_steps or None, spacing=s.spacing,
                               parameterization=d.parameterization, variance_type=d.variance,
                               clip_x0=clip, **levels)

    return sample


class Setup(NamedTuple):
    """What a config builds once the data shape is known."""

    process: Process
    network: Any
    objective: Objective
    init_params: Callable     # key -> params {"net": ..., ("schedule": ...)}
    sample: Callable          # (params, key) -> samples [n, *data_shape]


def build_setup(config: ml_collections.ConfigDict, dataset) -> Setup:
    process = build_process(config.diffusion)
    network = build_network(config, process, dataset.data_shape)
    objective = build_objective(config, network, process, discrete_8bit=dataset.is_discrete_8bit)
    x = jnp.zeros((1,) + tuple(dataset.data_shape), jnp.float32)
    t = jnp.ones((1,), jnp.int32) if process.discrete else jnp.full((1,), 0.5, jnp.float32)

    def init_params(key):
        k_net, k_schedule = jax.random.split(key)
        params = {}
        if process.schedule_net is not None:
            params["schedule"] = process.schedule_net.init(k_schedule, t)["params"]
        s = process.log_snr(params, t) if config.diffusion.time_input == "log_snr" else t
        params["net"] = network.init(k_net, x, s)["params"]
        return params

    return Setup(process, network, objective, init_params,
                 build_sampler(config, network, process, dataset.data_shape))


# ---------------------------------------------------------------------------
# The per-device train step.
# ---------------------------------------------------------------------------


def global_example_index(per_device_batch: int):
    """Global indices of this device's examples: device d (over all hosts) holds
    examples d * per_device_batch ... (d + 1) * per_device_batch - 1 of the global batch."""
    return jax.lax.axis_index(AXIS) * per_device_batch + jnp.arange(per_device_batch)


def train_step(state: TrainState, batch, *, objective, optimizer, optim):
    """One optimisation step on this device's share of the global batch (run under pmap).

    The loss is the mean over the global batch of per-example losses; gradients
    and metrics are averaged over devices with ``lax.pmean``. The importance
    sampler's history (if any) is updated with the losses of the whole global
    batch, gathered in global example order.
    """
    x = batch["x"]
    key, index = jax.random.fold_in(state.rng, state.step), global_example_index(x.shape[0])

    def mean_loss(params):
        per_example, aux = objective.loss(params, key, index, x, state.loss_state, True)
        return per_example.mean(), aux

    (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_rate = jnp.where(optimizer_stepped(optim, opt_state), 1.0 - ema_decay(optim, state.step), 0.0)
    ema_params = optax.incremental_update(params, state.ema_params, ema_rate)
    loss_state = objective.update_loss_state(state.loss_state, jax.lax.all_gather(aux, AXIS, tiled=True))
    metrics = {"loss": jax.lax.pmean(loss, AXIS), "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, loss_state=loss_state)
    return new_state, metrics


def make_p_train(objective, optimizer, optim) -> Callable:
    """pmapped ``(state, batches) -> (state, metrics)``; batches are [devices, k, per_device, ...]
    and the k steps run in one ``lax.scan`` (metrics come back with a leading k axis)."""
    step = functools.partial(train_step, objective=objective, optimizer=optimizer, optim=optim)

    def multi_step(state, batches):
        return jax.lax.scan(step, state, batches)

    return jax.pmap(multi_step, axis_name=AXIS)


# ---------------------------------------------------------------------------
# Evaluation with the EMA parameters.
# ---------------------------------------------------------------------------


def eval_step(params, loss_state, batch, rng, batch_index, *, objective):
    """Sums over one eval batch of the held-out loss and of the -ELBO estimate (bits/dim),
    over the real examples (``batch["mask"]``), with per-example keys as in training."""
    x, mask = batch["x"], batch["mask"]
    key, index = jax.random.fold_in(rng, batch_index), global_example_index(x.shape[0])
    loss, _ = objective.loss(params, key, index, x, loss_state, False)
    bpd = jax.vmap(objective.nelbo_bpd, in_axes=(None, 0, 0))(params, example_keys(key, index), x)
    sums = {"eval_loss": jnp.sum(loss * mask), "eval_bpd": jnp.sum(bpd * mask), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, AXIS)


def evaluate(p_eval, ema_params, loss_state, eval_ds, rng, eval_cfg) -> dict:
    """Means over the held-out split (its first ``eval_cfg.num_batches`` batches; 0 = all)."""
    totals = {}
    for i, batch in enumerate(eval_ds.iterate_epoch(eval_cfg.batch_size)):
        if eval_cfg.num_batches and i >= eval_cfg.num_batches:
            break
        sums = jax.device_get(p_eval(ema_params, loss_state, batch, rng, np.int32(i)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v[0])
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def write_samples(path: str, samples: np.ndarray) -> str:
    """Write samples as a PNG: an image grid ([N, H, W, C]), a 1-D histogram or a 2-D scatter plot."""
    if samples.ndim == 4:
        return viz.save_image_grid(path, samples, scale=viz.display_scale(samples.shape[1]))
    if samples.shape[-1] == 1:
        return viz.plot_1d_samples(path, samples[:, 0])
    return viz.plot_2d_samples(path, samples)


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


def checkpoint_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Async Orbax manager keeping the last ``train.keep_checkpoints`` steps in workdir/checkpoints.

    Orbax writes a step into a temporary directory and renames it when complete,
    so ``latest_step`` never names a half-written checkpoint.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved as workdir/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --config, or a workdir written by scripts/train.py")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, train: ml_collections.ConfigDict, step: int = -1, raw: bool = False):
    """(params, step): the EMA (or, with ``raw``, the raw) parameters of checkpoint ``step``
    (-1: the latest), restored as saved (no template needed) and put on the device."""
    manager = checkpoint_manager(workdir, train)
    step = manager.latest_step() if step < 0 else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {manager.directory}; "
                                f"available steps: {list(manager.all_steps())}")
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    # Orbax returns numpy leaves; device arrays allow traced indexing (per-step heads).
    return jax.device_put(state["params" if raw else "ema_params"]), step


def restore_or_init(manager: ocp.CheckpointManager, init_state: TrainState) -> TrainState:
    """The latest complete checkpoint if there is one, else ``init_state`` (host arrays)."""
    step = manager.latest_step()
    if step is None:
        return init_state
    return manager.restore(step, args=ocp.args.StandardRestore(init_state))


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as host numpy arrays."""
    return jax.device_get(jax.tree.map(lambda x: x[0], tree))


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


def _all_finite(metrics: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in metrics.values())


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
    setup = build_setup(config, train_ds)
    optimizer = make_optimizer(optim, train.num_steps)

    root = jax.random.PRNGKey(config.seed)
    params = setup.init_params(jax.random.fold_in(root, 0))
    init = jax.device_get(TrainState(
        step=jnp.int32(0), params=params, ema_params=params, opt_state=optimizer.init(params),
        rng=jax.random.fold_in(root, 1), loss_state=setup.objective.init_loss_state()))
    eval_rng, sample_rng = jax.random.fold_in(root, 2), jax.random.fold_in(root, 3)

    manager = checkpoint_manager(workdir, train)
    host_state = restore_or_init(manager, init)
    step = int(host_state.step)
    log = _Log(workdir, chief)
    log.console(f"{'resumed from' if step else 'starting at'} step {step}; "
                f"{jax.process_count()} process(es), {jax.device_count()} device(s), "
                f"global batch {train.batch_size}")
    state = flax.jax_utils.replicate(host_state, axis_name=AXIS)  # the sharding pmap outputs
    p_train = make_p_train(setup.objective, optimizer, optim)
    p_eval = jax.pmap(functools.partial(eval_step, objective=setup.objective), axis_name=AXIS,
                      in_axes=(0, 0, 0, None, None))
    k = train.steps_per_call
    last_bpd = "-"  # the test -ELBO of the last evaluation, shown on the progress line
    tick, tick_step = time.time(), step
    while step < train.num_steps:
        batches = _stack_steps([train_ds.get_batch(step + j) for j in range(k)])
        state, metrics = p_train(state, batches)
        metrics = jax.tree.map(lambda v: np.asarray(v[0]), jax.device_get(metrics))
        if not _all_finite(metrics):
            manager.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss or gradient at steps {step + 1}..{step + k}: "
                f"loss={metrics['loss'].tolist()}, grad_norm={metrics['grad_norm'].tolist()}. "
                f"Stopped without saving; the last good checkpoint is step {manager.latest_step()} "
                f"in {manager.directory}. Lower optim.lr or set optim.grad_clip.")
        step += k
        done = step == train.num_steps
        if step % train.log_every == 0 or done:
            now = time.time()
            rate = (step - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, step
            scalars = {key: float(v.mean()) for key, v in metrics.items()}
            log.write(step, {**scalars, "steps_per_sec": rate})
            log.console(f"step {step}/{train.num_steps} | loss {scalars['loss']:.4f} | "
                        f"eval bpd {last_bpd} | {rate:.1f} steps/s")
        if step % config.eval.every == 0 or done:
            scores = evaluate(p_eval, state.ema_params, state.loss_state, eval_ds, eval_rng, config.eval)
            last_bpd = f"{scores['eval_bpd']:.3f}"
            log.write(step, scores)
            log.console(f"eval at step {step}: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()))
            if chief and config.sample.num_samples > 0:
                samples = setup.sample(unreplicate(state.ema_params), jax.random.fold_in(sample_rng, step))
                path = write_samples(os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                                     np.asarray(samples))
                log.console(f"samples written to {path}")
            tick = time.time()  # do not count evaluation in steps/s
        if step % train.checkpoint_every == 0 or done:
            manager.save(step, args=ocp.args.StandardSave(unreplicate(state)))
            log.console(f"checkpoint step {step} saving")
    manager.wait_until_finished()
    manager.close()
    log.close()
    return unreplicate(state)
