"""Config validation: every field is checked before anything compiles.

A config (``configs/<experiment>.py``, ``get_config()``) has the sections
``data``, ``model``, ``diffusion``, ``loss``, ``optim``, ``train``, ``eval`` and
``sample`` plus a top-level ``seed``. ``validate(config)`` raises a ValueError
that names the field (``config.diffusion.parameterization``) and the allowed
values for the first bad field it finds; the data, model, loss and sampler
sections are checked by the modules that own them. This module holds the config's
shape (``defaults()``) and the order of the checks; the rules of each section are in
``vdm.config_sections`` (re-exported here).
"""
from __future__ import annotations

import ml_collections

from vdm import data as data_lib
from vdm import diffusion as diffusion_lib
from vdm.config_sections import (fail, refuse_unread_loss_fields, validate_conditional, validate_diffusion,
                                 validate_distributed, validate_eval, validate_loss, validate_model,
                                 validate_optim, validate_paths, validate_sample, validate_sample_method,
                                 validate_train)
# Re-exported: the choice lists and loss rules other modules read as ``config.<name>``.
from vdm.config_sections import (CONTINUOUS_SCHEDULES, DECAYS, TIME_INPUTS, TIMES,  # noqa: F401
                                 loss_fields_read)
from vdm.models import presets

SECTIONS = ("data", "model", "diffusion", "loss", "optim", "train", "eval", "sample")


def defaults() -> ml_collections.ConfigDict:
    """A config with every field, set for the default run (DDPM on the embedded 8x8 digits).

    Experiment files (configs/*.py) start from this and change what differs.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_lib.default_config()
    c.model = presets.digits_unet()
    # Cheaper than the preset so that the default run takes ~10 minutes on 2 CPU cores.
    c.model.update(dict(ch=16, num_res_blocks=1, attn_resolutions=()))
    c.diffusion = ml_collections.ConfigDict(dict(
        time="discrete",            # "discrete" (t = 1..T) or "continuous" (t in [0, 1])
        schedule="cosine",          # DISCRETE_SCHEDULES, or CONTINUOUS_SCHEDULES + ("learned",)
        schedule_kwargs=ml_collections.ConfigDict(),
        T=1000,                     # discrete: steps; continuous: 0 = continuous-time VDM loss, else its T-step form
        parameterization="eps",     # eps | x0 | v | score | flow | edm
        sigma_data=diffusion_lib.EDM_SIGMA_DATA,  # the "edm" parameterization's data std (Karras et al.)
        variance="fixed_large",     # fixed_small | fixed_large | learned_range | learned
        time_input="t",             # the network sees "t" (its time_range is (0, T) or (0, 1)) or "log_snr"
    ))
    c.loss = ml_collections.ConfigDict(dict(
        name="simple",              # simple | hybrid | vlb (discrete) ; vdm (continuous)
        loss_type="l2", weighting="none", target="", snr_gamma=5.0, hybrid_lambda=1e-3,
        decoder="auto",             # auto: discretized / categorical for 8-bit data, gaussian otherwise
        importance_sampling=False, history=10,  # loss-history sampling of t for "vlb"
        antithetic=True,            # vdm: low-discrepancy times over the global batch
        # continuous "simple" (EDM, flow matching): the training times (losses.sample_times)
        t_sampling="uniform", t_loc=0.0, t_scale=1.0,
        schedule_gradient="loss",   # vdm: the learned schedule's interior follows "loss" or "variance" (§5.2)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05, weight_decay=0.0, b1=0.9,
        b2=0.99, eps=1e-8, grad_clip=1.0, accum_steps=1, ema_decay=0.999))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=3000, batch_size=64,
        steps_per_call=1,           # steps per host call (one lax.scan); on CPU >= 10 amortises XLA's
                                    # per-call buffer allocation (docs/performance.md, item 12)
        log_every=100, checkpoint_every=1000, keep_checkpoints=2,
        label_dropout=0.0,          # data.conditional: p_uncond of classifier-free guidance (Ho & Salimans 2022)
        prefetch=2,                 # host calls whose batches a thread prepares ahead (0: none)
        distributed=False, coordinator_address="", num_processes=1, process_id=0,
        parallelism="pmap",         # pmap (replicated, jax.pmap) | mesh (one jit over a (data, fsdp) mesh)
        fsdp=1,                     # mesh: size of the fsdp axis the parameters and optimizer state are split over
        fsdp_min_size=1024))        # mesh: arrays with fewer elements stay replicated
    c.eval = ml_collections.ConfigDict(dict(
        every=1000, batch_size=100, num_batches=0,  # 0 = the whole held-out split
        elbo="mc", elbo_samples=8, elbo_chunk=50))
    c.sample = ml_collections.ConfigDict(dict(
        num_samples=64, sampler="ancestral", num_steps=0, spacing="linspace", clip_x0=True,
        options=ml_collections.ConfigDict()))  # the sampler's own: eta, order, method, S_churn, ...
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every field of a training config; raise ValueError naming the first bad one."""
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config is missing the section(s) {missing}; a config has {SECTIONS} and seed")
    if not isinstance(config.get("seed"), int):
        fail("seed", config.get("seed"), "must be an integer")
    validate_distributed(config.train)
    validate_train(config.train)
    validate_optim(config.optim)
    validate_diffusion(config.diffusion)
    validate_loss(config.loss, config.diffusion)
    validate_eval(config.eval, config.train)
    if config.eval.elbo == "exact" and config.diffusion.time != "discrete":
        fail("eval.elbo", "exact", "the exact sum over T terms needs diffusion.time = 'discrete'; use 'mc'")
    validate_sample(config.sample, config.diffusion)
    validate_paths(config.diffusion, config.loss)
    refuse_unread_loss_fields(config.loss, config.diffusion, defaults().loss)  # after the checks of what the loss is
    validate_sample_method(config.sample, config.diffusion)
    validate_model(config.model, config.diffusion)
    data_lib.validate_config(config.data)
    validate_conditional(config.data, config.train)
