"""Networks (Flax linen) and their construction from the config's ``model`` section.

    build_model(model_config, data_shape, learned_variance=False, num_classes=0) -> nn.Module

``model_config``: a ConfigDict (or dict) with ``name`` in ``NETWORKS`` (each network class
is registered there by ``registry.register`` on its definition) and any
of that network's fields (missing ones take the class defaults; presets.py
gives complete sections). ``data_shape``: one example's shape, (H, W, C) for
the image networks, (D,) for the toy ones. ``learned_variance`` (the output
gets twice the channels) and ``num_classes`` (class conditioning; 0 = none)
come from the diffusion and data sections, so the model section must not set
them. Every field is checked against the data shape before anything is traced:
a bad one raises ValueError naming ``model.<field>``.

Every network is called as

    module.apply({"params": params}, x, t, cond=None, train=False, rngs={"dropout": key})

with x [B, H, W, C] (NHWC) or [B, D]; t [B] the conditioning value, float32
(continuous time, t/T or log-SNR; each network maps its ``time_range`` pair to
0 and 1 before embedding) or, for ``per_step_heads``, the int32 step 1..T;
cond an int32 label array [B] or None, label ``num_classes`` being the null
class of classifier-free guidance (None means the null class). The output has
x's shape, with the last axis doubled when learned_variance. Dropout is active
only with train=True and needs the 'dropout' rng.

``dtype`` ('float32' or 'bfloat16') is the compute dtype; parameters and
outputs are float32.

Noise-conditional classifiers (classifier guidance) are in ``CLASSIFIERS`` and built by

    build_classifier(model_config, data_shape, num_classes, time_range) -> nn.Module

called as ``module.apply({"params": params}, x_t, log_snr, train=False)`` -> logits [B, num_classes].

The learned VDM schedule is ``LearnedLogSNR`` (schedule_net.py), a module
whose ``apply(params, t)`` is a t -> log_snr(t) schedule function.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vdm.models.noisy_classifier import NoisyClassifier
from vdm.models.registry import NETWORKS
from vdm.models.schedule_net import LearnedLogSNR
from vdm.models.toy import MLP, MeanVarNets, PerStepHeads  # importing a network module registers it
from vdm.models.unet import UNet
from vdm.models.vdm_net import VDMNet

CLASSIFIERS = {"noisy_classifier": NoisyClassifier}


def _build(model_config, data_shape, registry: dict, kind: str, set_by_build: dict, decided_by: str) -> nn.Module:
    """The module ``model_config.name`` of ``registry`` (a ``kind``) with the section's fields and
    ``set_by_build`` (fields ``decided_by`` other config sections), checked against data_shape."""
    fields = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    name = fields.pop("name", None)
    if name not in registry:
        raise ValueError(f"model.name must be one of {tuple(registry)} for a {kind}, got {name!r}")
    cls = registry[name]
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    for field in fields:
        if field in set_by_build:
            raise ValueError(f"model.{field} is set from {decided_by}; remove it from the model section")
        if field not in allowed:
            raise ValueError(f"model.{field} is not a field of the {name!r} {kind}; its fields are "
                             f"{[f for f in allowed if f not in set_by_build]}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    module = cls(**fields, **set_by_build)
    module.check(tuple(data_shape))
    return module.clone(dtype=jnp.dtype(module.dtype), param_dtype=jnp.dtype(module.param_dtype))


def build_model(model_config, data_shape, learned_variance: bool = False, num_classes: int = 0) -> nn.Module:
    """The network ``model_config.name`` with the section's fields, checked against data_shape."""
    return _build(model_config, data_shape, NETWORKS, "network",
                  dict(learned_variance=learned_variance, num_classes=num_classes), "the diffusion/data config")


def build_classifier(model_config, data_shape, num_classes: int, time_range) -> nn.Module:
    """The classifier ``model_config.name`` (in ``CLASSIFIERS``) for ``num_classes`` classes (from the data)
    conditioned on the log-SNR, ``time_range`` the training levels' (largest, smallest) log-SNR."""
    return _build(model_config, data_shape, CLASSIFIERS, "classifier",
                  dict(num_classes=int(num_classes), time_range=tuple(float(v) for v in time_range)),
                  "the data and the forward process")


__all__ = ["NETWORKS", "CLASSIFIERS", "build_model", "build_classifier", "NoisyClassifier", "LearnedLogSNR", "UNet",
           "VDMNet", "MLP", "PerStepHeads", "MeanVarNets"]
