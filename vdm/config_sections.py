"""The rules of each section of a training config, the choices they allow and the field
checks they share. ``vdm.config.validate`` runs them in order; every failure is a ValueError
``config.<section>.<field> = <value> is not allowed: <what is expected>``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from vdm import bounds
from vdm import diffusion as diffusion_lib
from vdm import losses
from vdm import models
from vdm import parallel
from vdm import samplers
from vdm import schedules

TIMES = ("discrete", "continuous")
TIME_INPUTS = ("t", "log_snr")
CONTINUOUS_SCHEDULES = schedules.CONTINUOUS_SCHEDULES + ("learned",)
CONTINUOUS_LOSSES = ("vdm", "simple")  # simple: losses.continuous_simple_loss (EDM, flow matching)
DECAYS = ("constant", "cosine")


def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field} = {value!r} is not allowed: {allowed}")


def one_of(section, name: str, prefix: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if section[name] not in allowed:
        fail(f"{prefix}.{name}", section[name], f"must be one of {allowed}")


def int_at_least(section, name: str, prefix: str, low: int) -> None:
    v = section[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        fail(f"{prefix}.{name}", v, f"must be an integer >= {low}")


def number_in(section, name: str, prefix: str, low: float, high: float,
               low_open: bool = False, high_open: bool = False) -> None:
    v = section[name]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        fail(f"{prefix}.{name}", v, f"must be a number in {lo}{low}, {high}{hi}")


def require(prefix: str, section, fields: Iterable[str]) -> None:
    missing = [f for f in fields if f not in section]
    if missing:
        raise ValueError(f"config.{prefix} is missing the field(s) {missing}")


def validate_optim(optim: ml_collections.ConfigDict) -> None:
    require("optim", optim, ("lr", "warmup_steps", "decay", "end_lr_factor", "weight_decay",
                                     "b1", "b2", "eps", "grad_clip", "accum_steps", "ema_decay"))
    number_in(optim, "lr", "optim", 0.0, float("inf"), low_open=True)
    int_at_least(optim, "warmup_steps", "optim", 0)
    one_of(optim, "decay", "optim", DECAYS)
    number_in(optim, "end_lr_factor", "optim", 0.0, 1.0)
    number_in(optim, "weight_decay", "optim", 0.0, float("inf"))
    number_in(optim, "b1", "optim", 0.0, 1.0, high_open=True)
    number_in(optim, "b2", "optim", 0.0, 1.0, high_open=True)
    number_in(optim, "eps", "optim", 0.0, float("inf"), low_open=True)
    number_in(optim, "grad_clip", "optim", 0.0, float("inf"))
    int_at_least(optim, "accum_steps", "optim", 1)
    number_in(optim, "ema_decay", "optim", 0.0, 1.0)


def validate_train(train: ml_collections.ConfigDict) -> None:
    require("train", train, ("num_steps", "batch_size", "steps_per_call", "log_every",
                                     "checkpoint_every", "keep_checkpoints", "prefetch"))
    int_at_least(train, "prefetch", "train", 0)
    for name in ("num_steps", "batch_size", "steps_per_call", "log_every", "checkpoint_every",
                 "keep_checkpoints"):
        int_at_least(train, name, "train", 1)
    k = train.steps_per_call
    for name in ("num_steps", "log_every", "checkpoint_every"):
        if train[name] % k:
            fail(f"train.{name}", train[name],
                  f"must be a multiple of train.steps_per_call = {k} (steps run {k} per host call)")
    n = jax.device_count()
    if train.batch_size % n:
        fail("train.batch_size", train.batch_size,
              f"must be divisible by the number of devices ({n}); e.g. {n * max(train.batch_size // n, 1)}")
    validate_parallelism(train)


def validate_parallelism(train: ml_collections.ConfigDict) -> None:
    """``train.parallelism`` and the mesh's fsdp axis (``vdm.parallel``): the mesh is
    (devices / fsdp, fsdp) over all devices of all processes, so fsdp must divide the device count."""
    require("train", train, ("parallelism", "fsdp", "fsdp_min_size"))
    one_of(train, "parallelism", "train", parallel.PARALLELISMS)
    int_at_least(train, "fsdp", "train", 1)
    int_at_least(train, "fsdp_min_size", "train", 0)
    n = jax.device_count()
    if train.parallelism == "pmap" and train.fsdp != 1:
        fail("train.fsdp", train.fsdp, "pmap replicates the parameters; set train.parallelism = 'mesh' "
              "to shard them, or train.fsdp = 1")
    if n % train.fsdp:
        fail("train.fsdp", train.fsdp, f"must divide the number of devices ({n}): the mesh is "
              f"(data, fsdp) = ({n} / fsdp, fsdp)")


def validate_distributed(train: ml_collections.ConfigDict) -> None:
    """The multi-host fields; checked before ``jax.distributed.initialize()`` runs."""
    require("train", train, ("distributed", "coordinator_address", "num_processes", "process_id"))
    if not isinstance(train.distributed, bool):
        fail("train.distributed", train.distributed, "must be True or False")
    if train.distributed and train.coordinator_address:
        int_at_least(train, "num_processes", "train", 1)
        if not (isinstance(train.process_id, int) and 0 <= train.process_id < train.num_processes):
            fail("train.process_id", train.process_id,
                  f"must be an integer in [0, train.num_processes = {train.num_processes})")


def validate_diffusion(d: ml_collections.ConfigDict) -> None:
    require("diffusion", d, ("time", "schedule", "schedule_kwargs", "T", "parameterization",
                              "variance", "time_input"))
    one_of(d, "time", "diffusion", TIMES)
    one_of(d, "parameterization", "diffusion", diffusion_lib.PARAMETERIZATIONS)
    one_of(d, "variance", "diffusion", diffusion_lib.VARIANCE_TYPES)
    one_of(d, "time_input", "diffusion", TIME_INPUTS)
    kwargs = dict(d.schedule_kwargs)
    if d.time == "discrete":
        one_of(d, "schedule", "diffusion", schedules.DISCRETE_SCHEDULES)
        int_at_least(d, "T", "diffusion", 1)
        try:
            schedules.discrete_schedule(d.schedule, d.T, **kwargs)
        except ValueError as e:
            fail("diffusion.schedule_kwargs", kwargs, str(e))
        return
    one_of(d, "schedule", "diffusion", CONTINUOUS_SCHEDULES)
    int_at_least(d, "T", "diffusion", 0)
    if diffusion_lib.learns_variance(d.variance):
        fail("diffusion.variance", d.variance, "continuous time (the VDM loss) has no reverse variance to "
              "learn; use 'fixed_small' or 'fixed_large' (they only affect sampling)")
    try:
        if d.schedule == "learned":
            models.LearnedLogSNR(**kwargs)
        else:
            fn = schedules.continuous_schedule(d.schedule, **kwargs)
            ends = [float(fn(0.0)), float(fn(1.0))]
            if d.time_input == "log_snr" and not all(math.isfinite(v) for v in ends):
                fail("diffusion.time_input", "log_snr", f"schedule {d.schedule!r} has log-SNR {ends} at "
                      "t = 0 and 1; the network needs finite ends, use time_input 't'")
    except (TypeError, ValueError) as e:
        if str(e).startswith("config."):
            raise
        fail("diffusion.schedule_kwargs", kwargs, str(e))


def validate_loss(loss: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    require("loss", loss, ("name", "loss_type", "weighting", "target", "snr_gamma", "hybrid_lambda",
                            "decoder", "importance_sampling", "history", "antithetic",
                            "schedule_gradient"))
    if d.time == "continuous":
        if loss.name not in CONTINUOUS_LOSSES:
            fail("loss.name", loss.name, f"continuous time (diffusion.time = 'continuous') trains with one of "
                  f"{CONTINUOUS_LOSSES}")
        one_of(loss, "decoder", "loss", ("auto",) + losses.VDM_DECODERS)
    else:
        one_of(loss, "name", "loss", losses.LOSS_KINDS)
        one_of(loss, "decoder", "loss", ("auto",) + losses.DECODERS)
    one_of(loss, "loss_type", "loss", losses.LOSS_TYPES)
    one_of(loss, "weighting", "loss", losses.WEIGHTINGS)
    one_of(loss, "target", "loss", ("",) + diffusion_lib.PARAMETERIZATIONS)
    number_in(loss, "snr_gamma", "loss", 0.0, float("inf"), low_open=True)
    number_in(loss, "hybrid_lambda", "loss", 0.0, float("inf"))
    int_at_least(loss, "history", "loss", 1)
    if loss.loss_type == "l1" and loss.weighting != "none":
        fail("loss.weighting", loss.weighting, "loss_type 'l1' allows weighting 'none' only")
    if loss.name == "simple" and diffusion_lib.learns_variance(d.variance):
        fail("loss.name", "simple", f"the simple loss does not train the variance of diffusion.variance = "
              f"{d.variance!r}; use 'hybrid' or 'vlb', or a fixed variance ('fixed_small', 'fixed_large')")
    one_of(loss, "schedule_gradient", "loss", losses.SCHEDULE_GRADIENTS)
    if not isinstance(loss.antithetic, bool):
        fail("loss.antithetic", loss.antithetic, "must be True or False")
    if not isinstance(loss.importance_sampling, bool):
        fail("loss.importance_sampling", loss.importance_sampling, "must be True or False")
    if loss.importance_sampling and (d.time != "discrete" or loss.name != "vlb"):
        fail("loss.importance_sampling", True, "importance-sampled t (Nichol & Dhariwal §3.3) applies to "
              "loss.name = 'vlb' in discrete time")


# The loss options that only some losses read; the others must leave them at their defaults.
OPTIONAL_LOSS_FIELDS = ("loss_type", "weighting", "target", "snr_gamma", "hybrid_lambda",
                        "t_sampling", "t_loc", "t_scale", "schedule_gradient")


def loss_fields_read(loss: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> set[str]:
    """The fields of OPTIONAL_LOSS_FIELDS that the configured loss reads (``build.build_objective``):
    discrete simple/hybrid read the simple loss's options (``snr_gamma`` with weighting
    ``min_snr`` only, ``hybrid_lambda`` for hybrid only); discrete vlb and continuous vdm read
    none but ``schedule_gradient`` (vdm); continuous simple reads the training-time distribution
    (``t_sampling``, ``t_loc``, ``t_scale``)."""
    if d.time == "continuous":
        return {"t_sampling", "t_loc", "t_scale"} if loss.name == "simple" else {"schedule_gradient"}
    if loss.name == "vlb":
        return set()
    read = {"loss_type", "weighting", "target"}
    if loss.weighting == "min_snr":
        read.add("snr_gamma")
    if loss.name == "hybrid":
        read.add("hybrid_lambda")
    return read


def refuse_unread_loss_fields(loss: ml_collections.ConfigDict, d: ml_collections.ConfigDict,
                              default: ml_collections.ConfigDict) -> None:
    """A loss option set to other than its ``default`` (the loss section of ``config.defaults()``)
    where the loss does not read it is refused, so that no field is silently ignored."""
    read = loss_fields_read(loss, d)
    for name in OPTIONAL_LOSS_FIELDS:
        if name not in read and name in loss and loss[name] != default[name]:
            if name == "snr_gamma" and "weighting" in read:
                why = f"only loss.weighting = 'min_snr' reads it (here {loss.weighting!r})"
            else:
                why = f"loss.name = {loss.name!r} in {d.time} time does not read it"
            fail(f"loss.{name}", loss[name], f"{why}; leave it at its default {default[name]!r}")


def validate_model(model: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    if "name" not in model or model.name not in models.NETWORKS:
        fail("model.name", model.get("name"), f"must be one of {tuple(models.NETWORKS)}")
    if model.name == "per_step_heads":
        if d.time != "discrete" or d.time_input != "t":
            fail("model.name", model.name, "has one head per integer step t: it needs diffusion.time "
                  "'discrete' and diffusion.time_input 't'")
        if model.get("num_steps") != d.T:
            fail("model.num_steps", model.get("num_steps"), f"must equal diffusion.T = {d.T} (one head "
                  "per step)")
    if "learned_variance" in model:
        fail("model.learned_variance", model.learned_variance, "the output channel sets follow "
              f"diffusion.variance (twice the channels for {diffusion_lib.VARIANCE_TYPES[2:]}); "
              "remove it from the model section")
    if "time_range" in model:
        fail("model.time_range", model.time_range, "is set from diffusion.time_input and the schedule; "
              "remove it from the model section")


def validate_eval(ev: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> None:
    require("eval", ev, ("every", "batch_size", "num_batches", "elbo", "elbo_samples", "elbo_chunk"))
    for name in ("every", "batch_size", "elbo_chunk"):
        int_at_least(ev, name, "eval", 1)
    int_at_least(ev, "num_batches", "eval", 0)
    int_at_least(ev, "elbo_samples", "eval", 2)
    one_of(ev, "elbo", "eval", bounds.EVAL_METHODS)
    if ev.every % train.steps_per_call:
        fail("eval.every", ev.every, f"must be a multiple of train.steps_per_call = {train.steps_per_call}")
    n = jax.device_count()
    if ev.batch_size % n:
        fail("eval.batch_size", ev.batch_size, f"must be divisible by the number of devices ({n})")


def validate_sample(sample: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    require("sample", sample, ("num_samples", "sampler", "num_steps", "spacing", "clip_x0"))
    int_at_least(sample, "num_samples", "sample", 0)
    int_at_least(sample, "num_steps", "sample", 0)
    one_of(sample, "sampler", "sample", samplers.SAMPLERS)
    one_of(sample, "spacing", "sample", samplers.DISCRETE_SPACINGS if d.time == "discrete"
            else samplers.CONTINUOUS_SPACINGS)
    if d.time == "discrete" and sample.num_steps > d.T:
        fail("sample.num_steps", sample.num_steps, f"must be at most diffusion.T = {d.T} (0 = all T steps)")
    if not isinstance(sample.clip_x0, bool):
        fail("sample.clip_x0", sample.clip_x0, "must be True or False")
    if d.time == "continuous":
        if sample.num_steps == 0 and d.T == 0:
            fail("sample.num_steps", 0, "continuous time with diffusion.T = 0 has no step count to default "
                  "to; set the number of sampling steps (e.g. 1000, as Kingma et al. 2021 sample)")
        return
    _check_discrete_grid(sample, d)


def _check_discrete_grid(sample: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    """The sampler's grid of a discrete schedule exists (no repeated timesteps), and a one-step
    learned variance ('learned') is sampled by ancestral / pc on all T steps only."""
    num_steps = sample.num_steps or d.T
    table = schedules.discrete_schedule(d.schedule, d.T, **dict(d.schedule_kwargs))
    try:
        grid = samplers.time_grid(num_steps, schedule=table, spacing=sample.spacing)
    except ValueError as e:
        fail("sample.spacing", sample.spacing, f"with sample.num_steps = {sample.num_steps} "
              f"({num_steps} steps) on diffusion.T = {d.T}: {e}")
    full = np.array_equal(grid.times[:-1], np.arange(d.T, 0, -1))
    if d.variance == "learned" and sample.sampler in ("ancestral", "pc") and not full:
        fail("sample.num_steps", sample.num_steps, f"diffusion.variance 'learned' is the log-variance of one "
              f"step t -> t-1, so sampler {sample.sampler!r} needs all T = {d.T} steps (num_steps 0 or T, "
              "spacing linspace); use 'learned_range' to respace, or sampler 'ddim'")


def validate_paths(d: ml_collections.ConfigDict, loss: ml_collections.ConfigDict) -> None:
    """The fields of EDM, flow matching and zero terminal SNR (Karras et al. 2022; Lipman et al.
    2023; Lin et al. 2024): sigma_data, the continuous simple loss's times, and the
    parameterizations a schedule reaching SNR 0 allows."""
    require("diffusion", d, ("sigma_data",))
    require("loss", loss, ("t_sampling", "t_loc", "t_scale"))
    number_in(d, "sigma_data", "diffusion", 0.0, float("inf"), low_open=True)
    one_of(loss, "t_sampling", "loss", losses.T_SAMPLINGS)
    number_in(loss, "t_loc", "loss", -float("inf"), float("inf"))
    number_in(loss, "t_scale", "loss", 0.0, float("inf"), low_open=True)
    if d.time == "discrete" and d.parameterization == "edm" and d.sigma_data != diffusion_lib.EDM_SIGMA_DATA:
        fail("diffusion.sigma_data", d.sigma_data, f"discrete-time losses use the default "
              f"{diffusion_lib.EDM_SIGMA_DATA}; another sigma_data needs diffusion.time = 'continuous'")
    if d.time == "continuous" and loss.name == "simple" and d.schedule == "learned":
        fail("loss.name", "simple", "a learned schedule is trained by the ELBO; use 'vdm' (the simple loss "
              "would move the schedule to where the regression is easiest)")
    if d.time == "continuous" and loss.name == "vdm" and d.schedule == "flow":
        fail("loss.name", "vdm", "the VDM loss needs finite log-SNR at t = 0 and 1; the 'flow' schedule's "
              "are +-inf: use loss.name 'simple' (conditional flow matching)")
    zero_snr = (d.time == "discrete" and bool(dict(d.schedule_kwargs).get("zero_terminal_snr"))) or (
        d.time == "continuous" and d.schedule == "flow")
    if zero_snr and d.parameterization in ("eps", "score"):
        fail("diffusion.parameterization", d.parameterization, "the schedule reaches SNR 0, where eps does not "
              "determine x0 (Lin et al. 2024, §3.2): use one of ('v', 'x0', 'flow', 'edm')")


def validate_sample_method(sample: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    """``sample.options`` against the sampler's own options, and whether the sampler can start at the
    grid's first level (SNR 0 for the 'flow' schedule or a zero-terminal-SNR table)."""
    require("sample", sample, ("options",))
    options = dict(sample.options)
    try:
        samplers.check_options(sample.sampler, options)
    except ValueError as e:
        fail("sample.options", options, str(e))
    if d.time == "discrete":
        table = schedules.discrete_schedule(d.schedule, d.T, **dict(d.schedule_kwargs))
        levels = dict(schedule=table)
    elif d.schedule == "learned":
        return
    else:
        levels = dict(log_snr_fn=schedules.continuous_schedule(d.schedule, **dict(d.schedule_kwargs)))
    num_steps = sample.num_steps or (d.T if d.time == "discrete" else 0)
    if not num_steps:
        return
    grid = samplers.time_grid(num_steps, spacing=sample.spacing, **levels)
    try:
        samplers.check_zero_snr_start(grid, sample.sampler, d.parameterization)
    except ValueError as e:
        fail("sample.sampler", sample.sampler, str(e))


def validate_conditional(data: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> None:
    """``train.label_dropout`` (p_uncond, Ho & Salimans 2022: 0.1-0.2) is in [0, 1) and is set
    only for a class-conditional run (``data.conditional``; the data's labels are checked by
    ``data.validate_config``)."""
    require("train", train, ("label_dropout",))
    number_in(train, "label_dropout", "train", 0.0, 1.0, high_open=True)
    if train.label_dropout and not data.get("conditional", False):
        fail("train.label_dropout", train.label_dropout, "drops labels of a class-conditional run only; "
              "set config.data.conditional = True (a data set with labels) or leave it at 0.0")
