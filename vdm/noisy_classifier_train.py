"""Training and evaluation of the noise-conditional classifier p_phi(y | x_t) of classifier guidance.

The classifier (``vdm.models.noisy_classifier``) is trained on labelled data noised by the
forward process of the config's ``diffusion`` section, at every noise level the diffusion
model is trained on (Dhariwal & Nichol 2021, §4: "we train a classifier p_phi(y | x_t, t)
on noisy images x_t"): per example t ~ U{1..T} (discrete) or t ~ U(T_CLIP, 1 - T_CLIP)
(continuous), x_t = alpha_t x_0 + sigma_t eps, and the loss is the cross-entropy of the
logits of (x_t, lambda_t). The classifier sees the log-SNR lambda_t, not t.

A classifier config has the sections ``seed``, ``data``, ``diffusion`` (the forward process;
copy the diffusion run's), ``model`` (a ``vdm.models.CLASSIFIERS`` section), ``optim`` and
``train`` (as a diffusion config's, ``vdm.config``) and ``eval`` (every, batch_size,
num_levels). The loop uses the diffusion trainer's pieces: TrainState (its loss_state empty),
the AdamW optimiser with warmup/decay and EMA, Orbax checkpoints holding the whole state with
the data position as the step (a rerun resumes exactly), metrics.jsonl and TensorBoard. It is
one jitted step on the default device (the batch is not split over devices).

The workdir holds config.json, checkpoints/ and classifier.json (data shape, class count and
the log-SNR range the network maps to [0, 1]), which ``load_classifier`` checks against the
diffusion model it is to guide.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vdm import build
from vdm import objective
from vdm import classifier_guidance
from vdm import checkpoints
from vdm import config as config_lib
from vdm import data as data_lib
from vdm import diffusion
from vdm import losses
from vdm import models
from vdm import train as train_lib
from vdm import train_step

META_FILE = "classifier.json"
SECTIONS = ("data", "diffusion", "model", "optim", "train", "eval")


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check a classifier config; ValueError naming the first bad field, before anything compiles."""
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config is missing the section(s) {missing}; a classifier config has {SECTIONS} and seed")
    if not isinstance(config.get("seed"), int):
        raise ValueError(f"config.seed = {config.get('seed')!r} is not allowed: must be an integer")
    config_lib.validate_train(config.train)
    config_lib.validate_optim(config.optim)
    config_lib.validate_diffusion(config.diffusion)
    if config.diffusion.time == "continuous" and config.diffusion.schedule == "learned":
        raise ValueError("config.diffusion.schedule = 'learned' is not allowed for the classifier: a learned "
                         "schedule's log-SNR lives in the diffusion run's parameters; train the classifier under "
                         "a fixed schedule covering the same log-SNR range")
    for name in ("every", "batch_size", "num_levels"):
        if name not in config.eval:
            raise ValueError(f"config.eval is missing the field {name!r} (every, batch_size, num_levels)")
        v = config.eval[name]
        low = 2 if name == "num_levels" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"config.eval.{name} = {v!r} is not allowed: must be an integer >= {low}")
    if config.model.get("name") not in models.CLASSIFIERS:
        raise ValueError(f"config.model.name = {config.model.get('name')!r} is not allowed: must be one of "
                         f"{tuple(models.CLASSIFIERS)} (a noise-conditional classifier)")
    data_lib.validate_config(config.data)


# ---------------------------------------------------------------------------
# Noise levels of the forward process.
# ---------------------------------------------------------------------------


def training_times(process: build.Process, keys):
    """One training time per key: t ~ U{1..T} (discrete) or U(T_CLIP, 1 - T_CLIP) (continuous)."""
    if process.discrete:
        return jax.vmap(lambda k: jax.random.randint(k, (), 1, process.T + 1))(keys)
    return losses.clipped_time(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys))


def evaluation_times(process: build.Process, num_levels: int) -> np.ndarray:
    """``num_levels`` times evenly spread over the training range, least noisy first."""
    if process.discrete:
        return np.unique(np.round(np.linspace(1, process.T, num_levels)).astype(np.int32))
    return np.asarray(losses.clipped_time(np.linspace(0.0, 1.0, num_levels)), np.float32)


def log_snr_range(process: build.Process) -> tuple[float, float]:
    """(log-SNR of the least noisy, of the most noisy) training level: the classifier's time_range."""
    lo, hi = evaluation_times(process, 2)[[0, -1]]
    return float(process.log_snr({}, lo)), float(process.log_snr({}, hi))


def noised(process: build.Process, keys, x, t):
    """(x_t, lambda_t): x_t = alpha_t x + sigma_t eps with eps ~ N(0, I) per example from its key."""
    lam = process.log_snr({}, t)
    alpha, sigma = diffusion.alpha_sigma(lam.reshape(lam.shape + (1,) * (x.ndim - 1)))
    return alpha * x + sigma * objective.example_normal(keys, x), lam


# ---------------------------------------------------------------------------
# Loss and accuracy.
# ---------------------------------------------------------------------------


def classifier_loss(network, process: build.Process, params, key, index, x, labels, train: bool = True):
    """(mean cross-entropy, accuracy) of the classifier on x_t at per-example training levels; the
    level and noise of example i come from its own key (``objective.example_keys``), dropout from a
    separate stream of ``key``."""
    k_examples, k_drop = jax.random.split(key)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(objective.example_keys(k_examples, index))
    t = training_times(process, keys[:, 0])
    x_t, lam = noised(process, keys[:, 1], x, t)
    logits = network.apply({"params": params}, x_t, lam, train=train,
                           rngs={"dropout": k_drop} if train else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(logits.argmax(-1) == labels)


def make_train_step(network, process, optimizer, optim) -> Callable:
    """jitted ``(state, x, labels) -> (state, metrics)``: one AdamW step and the EMA update."""

    def step(state: train_step.TrainState, x, labels):
        key = jax.random.fold_in(state.rng, state.step)
        index = jnp.arange(x.shape[0])
        grad_fn = jax.value_and_grad(lambda p: classifier_loss(network, process, p, key, index, x, labels),
                                     has_aux=True)
        (loss, acc), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_rate = jnp.where(train_step.optimizer_stepped(optimizer, opt_state),
                             1.0 - train_step.ema_decay(optim, state.step), 0.0)
        ema_params = optax.incremental_update(params, state.ema_params, ema_rate)
        metrics = {"loss": loss, "train_accuracy": acc, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics

    return jax.jit(step)


def make_correct_fn(network, process) -> Callable:
    """jitted ``(params, key, x, labels, t, index) -> bool [B]``: is the argmax of the logits of
    x_t (each example noised to level t with its own key) the label."""

    def correct(params, key, x, labels, t, index):
        x_t, lam = noised(process, objective.example_keys(key, index), x, jnp.full(x.shape[:1], t))
        return network.apply({"params": params}, x_t, lam).argmax(-1) == labels

    return jax.jit(correct)


class Compiled(NamedTuple):
    """The jitted functions of one (network, forward process, optimiser) triple."""

    process: build.Process
    optimizer: Any
    init: Callable
    train_step: Callable
    correct: Callable


@functools.lru_cache(maxsize=4)
def _compiled(network, diffusion_json: str, optim_json: str, num_steps: int) -> Compiled:
    """Built once per (network, diffusion section, optim section, steps), so that a resumed or
    repeated run in the same process reuses the compiled step (the configs enter as JSON)."""
    process = build.build_process(ml_collections.ConfigDict(json.loads(diffusion_json)))
    optim = ml_collections.ConfigDict(json.loads(optim_json))
    optimizer = train_step.make_optimizer(optim, num_steps)
    return Compiled(process, optimizer, jax.jit(network.init), make_train_step(network, process, optimizer, optim),
                    make_correct_fn(network, process))


def accuracy_vs_noise(correct: Callable, process: build.Process, params, dataset, times, key,
                      batch_size: int, num_draws: int = 1) -> list:
    """Held-out accuracy at each time in ``times``: every example of ``dataset`` (its whole split)
    noised ``num_draws`` times to that level (draw d of example i from fold_in(key, d) and i),
    classified by the argmax of the logits (``correct`` from ``make_correct_fn``).

    Rows {t, log_snr, accuracy, stderr, num_examples, num_draws}: accuracy is the mean over examples
    of each example's fraction correct over its draws, stderr that mean's standard error over examples
    (std / sqrt(n); with one draw, about the binomial sqrt(p (1 - p) / n)).
    """
    batches = [(b["x"].reshape((-1,) + b["x"].shape[2:]), b["label"].reshape(-1), b["mask"].reshape(-1))
               for b in dataset.iterate_epoch(batch_size)]
    rows = []
    for t in times:
        per_example = []
        for i, (x, y, mask) in enumerate(batches):
            index = jnp.arange(len(x)) + i * batch_size
            hits = np.mean([np.asarray(correct(params, jax.random.fold_in(key, d), x, y, t, index))
                            for d in range(num_draws)], axis=0)
            per_example.append(hits[mask])
        per_example = np.concatenate(per_example)
        n = len(per_example)
        rows.append({"t": t.item(), "log_snr": float(process.log_snr({}, t)), "accuracy": float(per_example.mean()),
                     "stderr": float(per_example.std(ddof=1) / np.sqrt(n)), "num_examples": n,
                     "num_draws": num_draws})
    return rows


# ---------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------


def _meta(dataset, process) -> dict:
    return {"data_shape": list(dataset.data_shape), "num_classes": int(dataset.num_classes),
            "log_snr_range": list(log_snr_range(process))}


def build_classifier(config: ml_collections.ConfigDict, meta: dict):
    """The config's classifier network for the data shape, class count and log-SNR range of ``meta``."""
    return models.build_classifier(config.model, tuple(meta["data_shape"]), meta["num_classes"],
                                   tuple(meta["log_snr_range"]))


def _open(config: ml_collections.ConfigDict, workdir: str):
    """(train split, test split, metadata, compiled functions, checkpoint manager, state): the
    data, the classifier and its state restored from the workdir's latest checkpoint (or
    initialised from the seed); writes config.json and the metadata file."""
    tc = config.train
    train_ds = data_lib.build_dataset(config.data, split="train", global_batch_size=tc.batch_size, seed=config.seed)
    if not train_ds.num_classes:
        raise ValueError(f"config.data (source {config.data.source!r}) has no labels; the classifier needs "
                         "labelled data")
    test_ds = data_lib.build_dataset(config.data, split="test", global_batch_size=config.eval.batch_size,
                                     seed=config.seed)
    meta = _meta(train_ds, build.build_process(config.diffusion))
    fns = _compiled(build_classifier(config, meta), config.diffusion.to_json(), config.optim.to_json(),
                    tc.num_steps)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    root = jax.random.PRNGKey(config.seed)
    x0 = jnp.zeros((1,) + train_ds.data_shape, jnp.float32)
    params = fns.init(jax.random.fold_in(root, 0), x0, jnp.zeros((1,), jnp.float32))["params"]
    init = jax.device_get(train_step.TrainState(step=jnp.int32(0), params=params, ema_params=params,
                                               opt_state=fns.optimizer.init(params), rng=jax.random.fold_in(root, 1),
                                               loss_state={}))
    manager = checkpoints.checkpoint_manager(workdir, tc)
    return train_ds, test_ds, meta, fns, manager, jax.device_put(checkpoints.restore_or_init(manager, init))


def _evaluate(config, fns, state, test_ds, times, key, log, step: int) -> None:
    """Log the EMA classifier's held-out accuracy at the evaluation levels."""
    rows = accuracy_vs_noise(fns.correct, fns.process, state.ema_params, test_ds, times, key, config.eval.batch_size)
    scores = {f"eval_accuracy_t{r['t']:g}": r["accuracy"] for r in rows}
    scores["eval_accuracy_mean"] = float(np.mean([r["accuracy"] for r in rows]))
    log.write(step, scores)
    log.console(f"eval at step {step}: mean accuracy over {len(rows)} levels {scores['eval_accuracy_mean']:.3f}; "
                + ", ".join(f"t={r['t']:g}: {r['accuracy']:.3f}" for r in rows))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_step.TrainState:
    """Train the classifier of ``config`` in ``workdir`` (resuming from its latest checkpoint),
    evaluating accuracy against noise level every ``eval.every`` steps; returns the final state."""
    validate_config(config)
    tc = config.train
    train_ds, test_ds, meta, fns, manager, state = _open(config, workdir)
    step = int(state.step)
    log = train_lib.MetricLog(workdir, chief=True)
    log.console(f"{'resumed from' if step else 'starting at'} step {step}; classifier with "
                f"{sum(a.size for a in jax.tree.leaves(state.params))} parameters, "
                f"log-SNR range {meta['log_snr_range']}")
    times = evaluation_times(fns.process, config.eval.num_levels)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    tick, tick_step = time.time(), step
    while step < tc.num_steps:
        batch = train_ds.get_batch(step)
        x, labels = (batch[k].reshape((-1,) + batch[k].shape[2:]) for k in ("x", "label"))
        state, metrics = fns.train_step(state, x, labels)
        step += 1
        done = step == tc.num_steps
        if step % tc.log_every == 0 or done:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite classifier loss at step {step}: {metrics}; lower optim.lr")
            now = time.time()
            rate = (step - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, step
            log.write(step, {**metrics, "steps_per_sec": rate})
            log.console(f"step {step}/{tc.num_steps} | loss {metrics['loss']:.4f} | "
                        f"train accuracy {metrics['train_accuracy']:.3f} | {rate:.1f} steps/s")
        if step % config.eval.every == 0 or done:
            _evaluate(config, fns, state, test_ds, times, eval_key, log, step)
            tick = time.time()
        if step % tc.checkpoint_every == 0 or done:
            manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)))
    manager.wait_until_finished()
    manager.close()
    log.close()
    return jax.device_get(state)


# ---------------------------------------------------------------------------
# A trained classifier, for guidance.
# ---------------------------------------------------------------------------


class ClassifierRun(NamedTuple):
    """A trained noise-conditional classifier: network, (EMA) params and what it was trained for."""

    network: Any
    params: Any
    num_classes: int
    data_shape: tuple
    step: int

    def log_prob(self, x_t, log_snr, labels):
        """log p_phi(y = labels | x_t) per example [B] (log-softmax of the logits)."""
        logits = self.network.apply({"params": self.params}, x_t, log_snr)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def load_classifier(workdir: str, step: int = -1) -> ClassifierRun:
    """The EMA classifier of checkpoint ``step`` (-1: the latest) of a ``train_and_evaluate`` workdir."""
    path = os.path.join(workdir, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --classifier_workdir must be a workdir written by "
                                "scripts/train_classifier.py")
    with open(path) as f:
        meta = json.load(f)
    config = checkpoints.load_run_config(workdir)
    params, step = checkpoints.restore_params(workdir, config.train, step)
    return ClassifierRun(build_classifier(config, meta), params, meta["num_classes"], tuple(meta["data_shape"]),
                         step)


def check_guidance_inputs(run: ClassifierRun, data_shape, labels) -> None:
    """ValueError unless the classifier was trained on data of ``data_shape`` and every label is one of
    its classes (checked on the host, before sampling)."""
    if tuple(run.data_shape) != tuple(data_shape):
        raise ValueError(f"the classifier was trained on data of shape {tuple(run.data_shape)}, but the model "
                         f"samples shape {tuple(data_shape)}; train a classifier on the model's data")
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= run.num_classes):
        raise ValueError(f"label(s) {sorted(set(labels[(labels < 0) | (labels >= run.num_classes)].tolist()))} "
                         f"out of range: the classifier has {run.num_classes} classes (labels 0..{run.num_classes - 1})")


def guided_model_fn(model_fn: Callable, run: ClassifierRun, labels, scale, process: build.Process, params,
                    diffusion_cfg: ml_collections.ConfigDict) -> Callable:
    """A diffusion run's ``model_fn(x_t, t)`` (``build.make_model_fn``) guided by the classifier ``run``
    towards ``labels`` [B] with scale s (``classifier_guidance.classifier_guidance``); the model's time
    is mapped to the log-SNR by its own process, so the classifier sees the level the model is at."""
    d = diffusion_cfg
    return classifier_guidance.classifier_guidance(
        model_fn, run.log_prob, labels, scale, log_snr_fn=lambda t: process.log_snr(params, t),
        parameterization=d.parameterization, variance_type=d.variance,
        sigma_data=d.get("sigma_data", diffusion.EDM_SIGMA_DATA))


def evaluate_classifier(workdir: str, num_levels: int, num_draws: int, seed: int = 0) -> list:
    """``accuracy_vs_noise`` of a trained classifier's EMA parameters (latest checkpoint) on the test
    split of its config, at ``num_levels`` evenly spread training levels with ``num_draws`` noise
    draws per example."""
    config = checkpoints.load_run_config(workdir)
    run = load_classifier(workdir)
    test_ds = data_lib.build_dataset(config.data, split="test", global_batch_size=config.eval.batch_size,
                                     seed=config.seed)
    fns = _compiled(run.network, config.diffusion.to_json(), config.optim.to_json(), config.train.num_steps)
    return accuracy_vs_noise(fns.correct, fns.process, run.params, test_ds, evaluation_times(fns.process, num_levels),
                             jax.random.PRNGKey(seed), config.eval.batch_size, num_draws)
