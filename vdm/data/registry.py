"""The data-source registry. A source is its opener plus one ``register`` line above it (in
``vdm.data.sources``); ``SOURCES``, config validation (``validate_config``) and
``build_dataset`` read this table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional


class Opened(NamedTuple):
    """One split of a source, as ``build_dataset`` needs it.

    examples    a finite source with ``len()`` and ``load(indices) -> (x [n, ...], labels [n] or
                None)``; None for an endless stream of fresh samples
    sample      ``(rng, n) -> (x, labels or None)`` drawing fresh samples (toy data), else None
    num_classes the number of label values; 0 without labels
    is_8bit     x is uint8 image data (scaled, flipped, padded and dequantized by the Dataset)
    log_prob    the exact log-density, a jnp function ``x [..., D] -> [...]``, else None
    """

    examples: Optional[object]
    sample: Optional[Callable]
    num_classes: int
    is_8bit: bool
    log_prob: Optional[Callable]


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """A registered source.

    open    (data section, split) -> Opened; may read the data
    check   (data section) -> None, raising ValueError naming the field; reads no data (a
            listing or a file's array names at most), so it runs before anything is loaded
    """

    open: Callable
    check: Callable


REGISTRY: dict[str, SourceInfo] = {}


def register(name: str, *, check: Optional[Callable] = None):
    """Decorator: make the opener available as ``data.source = name``, its fields checked by
    ``check`` (see ``SourceInfo``)."""
    def add(open_fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"data source {name!r} is registered twice")
        REGISTRY[name] = SourceInfo(open_fn, check or (lambda cfg: None))
        return open_fn
    return add
