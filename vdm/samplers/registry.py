"""The sampler registry. A sampler is its driver function plus one ``register`` call beside it
(in ``vdm.samplers.loops``); ``sample``, config validation (``sample.sampler``,
``sample.options``) and the network-call count read this table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler.

    fn            (den, x_T, keys, grid, *, trajectory_every, **options, **context) -> (x_0, Trajectory | None)
    defaults      its own options and their defaults (``sample.options`` of a config)
    check         ValueError for a bad option value, given the full options dict
    evaluations   network calls for n levels, given the full options dict
    needs_score   written with the score grad log q(x_t) = -eps_hat / sigma_t
    finite_start  written in y = x_t / alpha_t, so it cannot start at SNR 0
    context       run-time arguments ``sample`` supplies: "axis_name" (the pmap axis) and/or
                  "time_of" (log-SNR -> nearest model level)
    """

    fn: Callable
    defaults: dict
    check: Callable[[dict], None]
    evaluations: Callable[[int, dict], int]
    needs_score: bool
    finite_start: bool
    context: tuple


REGISTRY: dict[str, SamplerInfo] = {}


def register(name: str, *, defaults: dict | None = None, check: Callable[[dict], None] | None = None,
             evaluations: Callable[[int, dict], int] | None = None, needs_score: bool = False,
             finite_start: bool = False, context: tuple = ()):
    """Decorator: register a sampler driver under ``name`` (see ``SamplerInfo``). Without
    ``evaluations`` a sampler costs one network call per level."""
    def add(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"sampler {name!r} is registered twice")
        REGISTRY[name] = SamplerInfo(fn, dict(defaults or {}), check or (lambda opts: None),
                                     evaluations or (lambda n, opts: n), needs_score, finite_start,
                                     tuple(context))
        return fn
    return add


def lookup(sampler: str) -> SamplerInfo:
    """The registered sampler; ValueError naming the registered ones otherwise."""
    if sampler not in REGISTRY:
        raise ValueError(f"sampler must be one of {tuple(REGISTRY)}, got {sampler!r}")
    return REGISTRY[sampler]


def check_options(sampler: str, options: dict) -> dict:
    """The sampler's options with its defaults filled in; ValueError for an unknown sampler or
    option, or a bad value (``sample.options`` of a config is checked with this)."""
    info = lookup(sampler)
    unknown = set(options) - set(info.defaults)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for sampler {sampler!r}; "
                         f"its options are {sorted(info.defaults)}")
    opts = {**info.defaults, **options}
    info.check(opts)
    return opts


def num_evaluations(sampler: str, num_steps: int, options: dict | None = None) -> int:
    """Network evaluations (NFE) of ``sample`` with ``num_steps`` levels and these options."""
    opts = check_options(sampler, options or {})
    return lookup(sampler).evaluations(num_steps, opts)


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
