"""Fixed random streams and the held-out split.

Every random stream is ``np.random.default_rng([seed, tag, n])`` with a distinct tag >= 1 (a
zero tag would collide: SeedSequence ignores trailing zeros, so [s, 0, 0] is the same as [s]).
"""
from __future__ import annotations

import numpy as np

from vdm.data.config import error

SPLITS = ("train", "test")  # of every source except tfds, which takes any TFDS split string
DATA_SEED = 20240607  # fixes the held-out split and the toy point sets, whatever the run seed

(TAG_HOLDOUT, TAG_EPOCH, TAG_TRAIN_EXAMPLE, TAG_TOY_STEP, TAG_EVAL_EXAMPLE, TAG_TOY_TRAIN,
 TAG_TOY_TEST) = range(1, 8)


def holdout(n: int, num_test: int, split: str, source: str) -> np.ndarray:
    """Sorted indices of `split`: a fixed permutation of range(n) puts `num_test` of them in test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} for source={source!r}, got {split!r}")
    if split == "test" and num_test == 0:
        raise error("num_test", f"is 0, so source={source!r} has no test split")
    if num_test >= n:
        raise error("num_test", f"{num_test} leaves no training examples out of {n}")
    perm = np.random.default_rng([DATA_SEED, TAG_HOLDOUT, 0]).permutation(n)
    return np.sort(perm[n - num_test:] if split == "test" else perm[: n - num_test])
