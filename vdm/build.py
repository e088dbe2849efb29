"""Config -> objects: the noise process, the network, the model function, the training
objective with its ELBO estimate, the sampler, and the Setup that bundles them.

This is the one place a config section is turned into the callables of the math modules
(``vdm.schedules``, ``diffusion``, ``losses``, ``samplers``) and of ``vdm.models``; the
training loop (``vdm.train``) and the scripts build through it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm import diffusion
from vdm import losses
from vdm import models
from vdm import objective
from vdm import samplers
from vdm import schedules

# ---------------------------------------------------------------------------
# The network as the model function of losses and samplers.
# ---------------------------------------------------------------------------


class Process(NamedTuple):
    """The noise process of a config.

    ``log_snr(params, t)`` maps the loss's/sampler's own time variable (int32
    1..T for a discrete schedule, float32 in [0, 1] for a continuous one) to the
    log-SNR; with a learned schedule it reads ``params["schedule"]``.
    ``schedule`` is the DiscreteSchedule (None in continuous time) and
    ``schedule_net`` the LearnedLogSNR module (None unless learned). ``input_scale``
    maps the log-SNR to the factor the network input is multiplied by (EDM's c_in,
    ``diffusion.network_input_scale``), None for the identity.
    """

    discrete: bool
    T: int
    schedule: Any
    schedule_net: Any
    log_snr: Callable
    input_scale: Callable | None = None


def build_process(diffusion_cfg: ml_collections.ConfigDict) -> Process:
    d = diffusion_cfg
    kwargs = dict(d.schedule_kwargs)
    scale = None
    if d.parameterization == "edm":
        scale = functools.partial(diffusion.network_input_scale, parameterization="edm", sigma_data=d.sigma_data)
    if d.time == "discrete":
        table = schedules.discrete_schedule(d.schedule, d.T, **kwargs)
        return Process(True, d.T, table, None, lambda params, t: table.log_snr[t], scale)
    if d.schedule == "learned":
        net = models.LearnedLogSNR(**kwargs)
        return Process(False, d.T, None, net, lambda params, t: net.apply({"params": params["schedule"]}, t),
                       scale)
    fn = schedules.continuous_schedule(d.schedule, **kwargs)
    return Process(False, d.T, None, None, lambda params, t: fn(t), scale)


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


def build_network(config: ml_collections.ConfigDict, process: Process, data_shape, num_classes: int = 0) -> Any:
    """The config's network with ``time_range`` set from the diffusion section and ``num_classes``
    labels (0: unconditional; else label ``num_classes`` is the null class)."""
    fields = config.model.to_dict()
    if "time_range" in {f.name for f in dataclasses.fields(models.NETWORKS[fields["name"]])}:
        fields["time_range"] = network_time_range(config.diffusion, process)
    return models.build_model(fields, data_shape, num_classes=num_classes,
                              learned_variance=diffusion.learns_variance(config.diffusion.variance))


def make_model_fn(network, process: Process, time_input: str, params, *, train: bool = False,
                  dropout_key=None, labels=None) -> Callable:
    """The network as ``model_fn(x_t, t) -> output`` (docs/design.md, model interface): the loss's
    or sampler's t is passed on as is (``time_input = "t"``) or as its log-SNR; x_t is scaled by
    ``process.input_scale`` (EDM's c_in) when the process has one.

    A class-conditional network sees ``labels`` (int32 [B], or one label for every row of x_t;
    None: the null class); ``model_fn(x_t, t, labels)`` overrides them (the form
    ``samplers.sample(..., labels=...)`` and classifier-free guidance call)."""
    rngs = {"dropout": dropout_key} if dropout_key is not None else None

    def model_fn(x_t, t, labels=labels):
        s = process.log_snr(params, t) if time_input == "log_snr" else t
        if process.input_scale is not None:
            scale = process.input_scale(process.log_snr(params, t))
            x_t = x_t * jnp.reshape(scale, scale.shape + (1,) * (x_t.ndim - scale.ndim))
        cond = None if labels is None else jnp.broadcast_to(labels, x_t.shape[:1])
        return network.apply({"params": params["net"]}, x_t, s, cond, train=train, rngs=rngs)

    return model_fn


# ---------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------

def build_objective(config: ml_collections.ConfigDict, network, process: Process, *,
                    discrete_8bit: bool) -> objective.Objective:
    """The loss of ``config.loss`` from ``vdm.losses`` and the ELBO estimate of ``config.eval``.

    Timesteps and noise are drawn per example (``objective.split_example_keys``) and handed to the loss.
    Dropout masks come from one key per device (Flax draws a mask per batch), so with dropout
    a step matches across device counts in distribution only.
    """
    d, lc = config.diffusion, config.loss
    decoder = objective.decoder_for(lc, discrete_8bit)

    def model_fn(params, key, train, labels):
        return make_model_fn(network, process, d.time_input, params, train=train,
                             dropout_key=key if train else None, labels=labels)

    if process.discrete:
        loss = objective.discrete_loss_fn(config, model_fn, process, decoder)
    elif lc.name == "simple":
        loss = objective.continuous_simple_loss_fn(config, model_fn, process)
    else:
        loss = objective.vdm_loss_fn(config, model_fn, process, decoder)
    if process.discrete and lc.importance_sampling:
        init = lambda: losses.loss_history_init(process.T, lc.history)  # noqa: E731
        update = lambda s, aux: losses.loss_history_update(s, aux["t"], aux["vlb_term"])  # noqa: E731
    else:
        init, update = dict, lambda s, aux: s  # noqa: E731
    def model_fn_of(params, label):
        return make_model_fn(network, process, d.time_input, params, labels=label)

    return objective.Objective(
        objective.with_label_dropout(loss, network.num_classes, config.train.get("label_dropout", 0.0)),
        objective.elbo_bpd_fn(config, process, model_fn_of, decoder), init, update, network.num_classes)


def sampling_steps(sample_cfg: ml_collections.ConfigDict, diffusion_cfg: ml_collections.ConfigDict):
    """``sample.num_steps``; 0 means every step: all T steps of a discrete schedule, or the
    T of a continuous-time model trained with the T-step loss (validation refuses 0 with T = 0)."""
    return sample_cfg.num_steps or diffusion_cfg.T or None


def build_sampler(config: ml_collections.ConfigDict, network, process: Process, data_shape) -> Callable:
    """The one way a trained model is sampled: ``sample(params, key, **overrides)`` runs
    ``vdm.samplers.sample`` with the config's ``sample`` settings, where an override that is not
    None replaces one: ``num_samples``, ``sampler``, ``num_steps``, ``spacing``, ``options`` (the
    sampler's own; by default ``sample.options`` when the sampler is the config's, else none) and
    ``clip_x0`` (by default x0 predictions are clipped to [-1, 1] for image data when
    ``sample.clip_x0``).

    A class-conditional network samples ``labels`` [n] (default: sample i of class i mod K;
    the null class is K) at classifier-free guidance scale ``guidance_scale`` (Ho & Salimans
    2022; None or 0: the conditional model). ``guide(model_fn, params) -> model_fn`` wraps an
    unconditional model (classifier guidance, ``vdm.classifier_guidance``). Other keywords
    (``trajectory_every``) go to ``samplers.sample`` as they are.

    The parameters and labels are traced arguments of one compiled sampler (``samplers.sample(...,
    params=...)``), so evaluations during training reuse a single compile, and so does each
    guidance scale; only the grid of a learned schedule is recomputed on the host from the
    given parameters. A ``guide`` is compiled once per call.
    """
    s, d = config.sample, config.diffusion
    images, num_classes = len(data_shape) == 3, network.num_classes

    def model(params, x_t, t, *labels):
        return make_model_fn(network, process, d.time_input, params)(x_t, t, *labels)

    def guided(guide):
        return lambda params, x_t, t: guide(functools.partial(model, params), params)(x_t, t)

    def label_args(n, labels, guidance_scale, guide) -> dict:
        if not num_classes:
            if labels is not None or guidance_scale:
                raise ValueError("labels and guidance_scale need a class-conditional model (config.data.conditional)")
            return {}
        if guide is not None:
            raise ValueError("classifier guidance (guide) takes an unconditional model; this one is class-conditional")
        labels = np.arange(n, dtype=np.int32) % num_classes if labels is None else np.asarray(labels, np.int32)
        if labels.shape != (n,) or labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"labels must be {n} classes in 0..{num_classes} (null class {num_classes}), "
                             f"got {labels}")
        return dict(labels=labels, null_label=num_classes, guidance_scale=guidance_scale or None)

    def sample(params, key, *, num_samples=None, sampler=None, num_steps=None, spacing=None, options=None,
               clip_x0=None, labels=None, guidance_scale=None, guide=None, **extra):
        n, sampler = num_samples or s.num_samples, sampler or s.sampler
        if options is None:
            options = dict(s.get("options", {})) if sampler == s.sampler else {}
        levels = (dict(schedule=process.schedule) if process.discrete
                  else dict(log_snr_fn=lambda t: process.log_snr(params, t)))
        return samplers.sample(model if guide is None else guided(guide), key, (n,) + tuple(data_shape),
                               sampler=sampler, num_steps=num_steps or sampling_steps(s, d),
                               spacing=spacing or s.spacing, parameterization=d.parameterization,
                               variance_type=d.variance,
                               clip_x0=bool(s.clip_x0 and images) if clip_x0 is None else clip_x0,
                               params=params, sigma_data=d.get("sigma_data", diffusion.EDM_SIGMA_DATA),
                               **label_args(n, labels, guidance_scale, guide), **options, **levels, **extra)

    return sample


class Setup(NamedTuple):
    """What a config builds once the data shape is known."""

    process: Process
    network: Any
    objective: objective.Objective
    init_params: Callable     # key -> params {"net": ..., ("schedule": ...)}
    sample: Callable          # (params, key, **overrides) -> samples [n, *data_shape] (build_sampler)


def build_setup(config: ml_collections.ConfigDict, dataset) -> Setup:
    """The Setup of ``config`` on ``dataset`` (a class-conditional network on its
    ``num_classes`` labels when ``config.data.conditional``)."""
    process = build_process(config.diffusion)
    num_classes = dataset.num_classes if config.data.get("conditional", False) else 0
    network = build_network(config, process, dataset.data_shape, num_classes)
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
