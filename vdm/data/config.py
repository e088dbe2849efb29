"""The config's `data` section: its fields, their defaults and the checks every source shares.

A source's own checks are registered with it (``vdm.data.registry``) and run by
``validate_config`` after these.
"""
from __future__ import annotations

import ml_collections

from vdm.data.registry import REGISTRY


def default_config() -> ml_collections.ConfigDict:
    """The `data` config section with every field (the digits defaults)."""
    return ml_collections.ConfigDict(dict(
        source="digits",     # one of SOURCES
        name="",             # TFDS builder name (source=tfds) or toy distribution (source=toy)
        data_dir="",         # TFDS data_dir; "" = the TFDS default
        path="",             # image folder (source=folder) or .npz file (source=npz)
        npz_key="x",         # array of images / data in the .npz
        npz_label_key="",    # integer labels in the .npz; "" = none
        channels=3,          # source=folder: 3 (RGB) or 1 (grey)
        image_size=0,        # 0 = native size; else shorter side scaled + centre crop (folder: required)
        pad_to=0,            # 0 = none; else zero-pad images to pad_to x pad_to
        dequantize=False,    # 8-bit images: uniform dequantization instead of the discrete grid
        random_flip=False,   # 8-bit images: random left-right flips of training batches
        num_points=0,        # source=toy, train: 0 = fresh samples every step; N = fixed set of N points
        num_test=297,        # digits/folder/npz: examples held out as `test`; toy: test points
        skip_bad_files=False,  # source=folder: unreadable files stop the run (False) or are skipped
        workers=0,           # folder/tfds: threads decoding a batch's images; 0 = min(8, CPU count)
        conditional=False,   # condition the model on the labels (class-conditional training)
    ))


def error(field: str, message: str) -> ValueError:
    return ValueError(f"config.data.{field}: {message}")


def no_labels(why: str) -> ValueError:
    """The error of ``conditional=True`` on a source without labels (a source's check raises it)."""
    return error("conditional", f"True needs a data set with labels; {why}")


def validate_config(cfg) -> ml_collections.ConfigDict:
    """Checks the `data` section without reading any data; returns it with defaults filled in.

    Raises ValueError naming the field for an unknown field or source, a field of the wrong
    type, or whatever the source's registered check rejects (a TFDS name that
    `tfds.list_builders()` does not know, a toy name that does not exist, a missing folder /
    file / npz key, a bad size, ``conditional`` without labels).
    """
    full = default_config().to_dict()
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(full))
    if unknown:
        raise ValueError(f"config.data has unknown field(s) {unknown}; allowed: {sorted(full)}")
    c = ml_collections.ConfigDict({**full, **given})
    _check_types(c)
    REGISTRY[c.source].check(c)
    return c


def _check_types(c) -> None:
    """Every field's type and range, and a registered source."""
    for field in ("source", "name", "data_dir", "path", "npz_key", "npz_label_key"):
        if not isinstance(c[field], str):
            raise error(field, f"must be a string, got {c[field]!r}")
    if c.source not in REGISTRY:
        raise error("source", f"unknown source {c.source!r}; allowed: {list(REGISTRY)}")
    for field in ("channels", "image_size", "pad_to", "num_points", "num_test", "workers"):
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < 0:
            raise error(field, f"must be a non-negative int, got {c[field]!r}")
    for field in ("dequantize", "random_flip", "skip_bad_files", "conditional"):
        if not isinstance(c[field], bool):
            raise error(field, f"must be True or False, got {c[field]!r}")
