"""Reference likelihoods for 8-bit images: the best factorized model of a split.

An independent categorical distribution over the 256 values of every pixel (and channel),
fitted on the training split with add-alpha smoothing,

    P_d(k) = (n_dk + alpha) / (N + 256 alpha),

where n_dk counts training images whose dimension d has value k. Its test bits/dim tell
whether a diffusion model has learned more than the pixel marginals. alpha is chosen on
the training split alone, by the leave-one-out log-likelihood (closed form: holding out
an image replaces n_dk by n_dk - 1 and N by N - 1), from ``ALPHAS``; the test split
only reports. NumPy only.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np

NUM_VALUES = 256
ALPHAS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


class PixelCategorical(NamedTuple):
    """log P_d(k) for every dimension d (flattened) and value k: [D, 256]; alpha; training size."""

    log_probs: np.ndarray
    alpha: float
    num_train: int


def to_8bit(x) -> np.ndarray:
    """Pixel values k in 0..255 of data x = k / 127.5 - 1 (dequantized data round back to k)."""
    return np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.int64)


def _images(batches: Iterable) -> Iterable[np.ndarray]:
    """Flattened 8-bit images [b, D] of batches: arrays [b, ...], or dicts with x and a mask
    that is False on padding (``Dataset.iterate_epoch``'s [L, b/L, ...] or flat)."""
    for batch in batches:
        if not isinstance(batch, dict):
            yield to_8bit(batch).reshape(np.shape(batch)[0], -1)
            continue
        mask = np.asarray(batch["mask"], bool).reshape(-1)
        yield to_8bit(batch["x"]).reshape(mask.size, -1)[mask]


def pixel_counts(batches: Iterable) -> np.ndarray:
    """n_dk: [D, 256] counts of value k at dimension d over the batches' images."""
    counts = None
    for k in _images(batches):
        flat = np.bincount((np.arange(k.shape[1]) * NUM_VALUES + k).reshape(-1),
                           minlength=k.shape[1] * NUM_VALUES).reshape(k.shape[1], NUM_VALUES)
        counts = flat if counts is None else counts + flat
    if counts is None:
        raise ValueError("batches yielded no images")
    return counts


def leave_one_out_log_likelihood(counts: np.ndarray, alpha: float) -> float:
    """Sum over training images of log P(image) under the model fitted to the others (nats)."""
    n = int(counts[0].sum())
    c = counts[counts > 0].astype(np.float64)
    return float(np.sum(c * np.log((c - 1.0 + alpha) / (n - 1.0 + NUM_VALUES * alpha))))


def reference_bpd(train_batches: Iterable, test_batches: Iterable) -> dict:
    """The per-pixel baseline of a split: fit on ``train_batches``, bits/dim on ``test_batches``
    ({"mean", "stderr", "num_examples", "alpha", "num_train"})."""
    model = fit(train_batches)
    return {**bits_per_dim(model, test_batches), "alpha": model.alpha, "num_train": model.num_train}


def fit(train_batches: Iterable, alphas: Iterable[float] = ALPHAS) -> PixelCategorical:
    """Fit on the training batches, alpha chosen by the leave-one-out likelihood (module docstring)."""
    alphas = tuple(alphas)
    if not alphas or any(not a > 0 for a in alphas):
        raise ValueError(f"alphas must be positive numbers, got {alphas!r}")
    counts = pixel_counts(train_batches)
    n = int(counts[0].sum())
    if n < 2:
        raise ValueError(f"need at least 2 training images to choose alpha, got {n}")
    alpha = max(alphas, key=lambda a: leave_one_out_log_likelihood(counts, a))
    log_probs = np.log(counts + alpha) - math.log(n + NUM_VALUES * alpha)
    return PixelCategorical(log_probs, float(alpha), n)


def bits_per_dim(model: PixelCategorical, batches: Iterable) -> dict:
    """-log2 P(image) / D over the batches' images: {"mean", "stderr" (over images), "num_examples"}."""
    per_image = []
    for k in _images(batches):
        if k.shape[1] != model.log_probs.shape[0]:
            raise ValueError(f"images have {k.shape[1]} dimensions, the model {model.log_probs.shape[0]}")
        lp = model.log_probs[np.arange(k.shape[1]), k]                       # [b, D]
        per_image.append(-lp.mean(axis=1) / math.log(2.0))
    v = np.concatenate(per_image)
    if v.size < 2:
        raise ValueError("need at least 2 images for a standard error")
    return {"mean": float(v.mean()), "stderr": float(v.std(ddof=1) / math.sqrt(v.size)),
            "num_examples": int(v.size)}
