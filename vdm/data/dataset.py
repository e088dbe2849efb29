"""The Dataset: batches of one split of a registered source, sharded over processes and devices.

Determinism and resume. ``get_batch(step)`` is a pure function of (seed, step,
process): the global batch of step s holds positions ``s*B .. s*B+B-1`` of an endless
stream of epochs, epoch e being a permutation of the split drawn from (seed, e);
process i takes the i-th contiguous block of ``B / process_count`` positions (process
0's devices first, the order of ``jax.devices()``). Flips and dequantization
noise are drawn per example from its global position, so the global batch does not
depend on the number of processes or devices, and the data position in a checkpoint is
just the step. ``iterate_epoch(batch_size)`` visits the split in index order; its last
batch is padded with example 0 and ``mask`` marks the real examples.

Workers. The images of a batch (any 8-bit image source) are decoded, fitted, flipped and
scaled by ``cfg.workers`` threads (0: min(8, CPU count)), one contiguous chunk of the batch
each; every example is converted on its own, so the batch does not depend on the count.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator, Optional

import jax
import numpy as np

from vdm.data.config import error, no_labels, validate_config
from vdm.data.images import pad
from vdm.data.registry import REGISTRY
from vdm.data.splits import TAG_EPOCH, TAG_EVAL_EXAMPLE, TAG_TOY_STEP, TAG_TRAIN_EXAMPLE


def num_workers(cfg) -> int:
    """The decoding threads of ``cfg.workers`` (0: min(8, CPU count))."""
    return cfg.workers or min(8, os.cpu_count() or 1)


class _Workers:
    """Threads that load the images of a batch in parallel, one chunk of the batch each (PIL's
    decoders and resizing, and NumPy's array loops, release the GIL). ``map`` keeps the order of
    its items and every example is converted on its own (its flip and noise drawn from its
    position), so a batch is the same whatever the number of threads; one worker runs in the
    caller's thread. The threads exist only while a pool is open: ``close`` ends them, and being threads
    of this process, a SIGKILL of the process leaves none behind."""

    def __init__(self, count: int):
        self.count, self._pool = count, None

    def map(self, fn, items) -> list:
        if self.count == 1:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.count, thread_name_prefix="vdm-decode")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Dataset:
    """Batches of one split; build with `build_dataset`. See the module docstring."""

    def __init__(self, *, cfg, split, seed, global_batch_size, process_index, process_count,
                 local_device_count, examples, sample, num_classes, is_8bit, log_prob):
        self.split, self.seed = split, seed
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_device_count = local_device_count
        self.per_device_batch = global_batch_size // (process_count * local_device_count)
        self.num_classes = num_classes
        self.is_discrete_8bit = is_8bit and not cfg.dequantize
        self.log_prob = log_prob
        self._examples, self._sample = examples, sample
        self._workers = _Workers(num_workers(cfg))
        self._is_8bit, self._pad_to = is_8bit, cfg.pad_to
        self._dequantize = is_8bit and cfg.dequantize
        self._flip = is_8bit and cfg.random_flip and split == "train"
        self._permutations = {}
        self.num_examples = None if examples is None else len(examples)
        first = (sample(np.random.default_rng(0), 1) if examples is None else examples.load(np.array([0])))[0]
        if is_8bit and cfg.pad_to and any(d > cfg.pad_to for d in first.shape[1:3]):
            raise error("pad_to", f"{cfg.pad_to} is smaller than the images {first.shape[1:3]}")
        self.data_shape = tuple(pad(first, cfg.pad_to).shape[1:]) if is_8bit else tuple(first.shape[1:])

    # -- training batches ----------------------------------------------------

    def get_batch(self, step: int) -> dict:
        """The process's shard of the global batch of `step` (shuffled per epoch from the seed)."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        n = self.global_batch_size // self.process_count
        first = self.process_index * n
        if self._examples is None:
            rng = np.random.default_rng([self.seed, TAG_TOY_STEP, int(step)])
            x, labels = self._sample(rng, self.global_batch_size)
            batch = {"x": x[first: first + n]}
            if self.num_classes:
                batch["label"] = labels[first: first + n].astype(np.int32)
            return self._shard(batch)
        positions = int(step) * self.global_batch_size + first + np.arange(n, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty_like(positions)
        for e in np.unique(epochs):
            indices[epochs == e] = self._permutation(int(e))[offsets[epochs == e]]
        return self._batch(indices, positions, TAG_TRAIN_EXAMPLE, self._flip)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs at a time
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, TAG_EPOCH, epoch])
            self._permutations[epoch] = rng.permutation(self.num_examples)
        return self._permutations[epoch]

    # -- evaluation ------------------------------------------------------------

    def iterate_epoch(self, batch_size: int) -> Iterator[dict]:
        """The split once, in index order, in global batches of `batch_size` (this process's shard).

        Every process yields ceil(num_examples / batch_size) batches; the last is padded
        with example 0 and "mask" (bool [L, b]) is False on the padding.
        """
        if self._examples is None:
            raise ValueError(f"split {self.split!r} is an endless stream of fresh samples "
                             "(config.data.num_points = 0); iterate the 'test' split instead")
        _check_batch_size(batch_size, self.process_count, self.local_device_count, "batch_size")
        n = batch_size // self.process_count
        for start in range(0, self.num_examples, batch_size):
            positions = start + self.process_index * n + np.arange(n, dtype=np.int64)
            mask = positions < self.num_examples
            batch = self._batch(np.where(mask, positions, 0), positions, TAG_EVAL_EXAMPLE, False)
            batch["mask"] = mask.reshape(self.local_device_count, -1)
            yield batch

    # -- shared ----------------------------------------------------------------

    def _batch(self, indices, positions, tag, flip) -> dict:
        if self._is_8bit:  # decoded, fitted and scaled in parallel chunks of the batch
            chunks = np.array_split(np.arange(len(indices)), min(self._workers.count, len(indices)))
            parts = self._workers.map(lambda c: self._load_images(indices[c], positions[c], tag, flip), chunks)
            x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        else:
            x, labels = self._examples.load(indices)
        batch = {"x": x}
        if self.num_classes:
            batch["label"] = labels.astype(np.int32)
        return self._shard(batch)

    def _load_images(self, indices, positions, tag, flip):
        """(float32 images, labels or None) of examples ``indices`` at stream ``positions``."""
        images, labels = self._examples.load(indices)
        return self._images_to_float(images, positions, tag, flip), labels

    def _images_to_float(self, images, positions, tag, flip) -> np.ndarray:
        """uint8 [n, H, W, C] -> float32 in [-1, 1]: flip, pad, scale, dequantize (module docstring)."""
        images = np.array(images)
        shape = pad(images[:1], self._pad_to).shape[1:]
        noise = np.zeros((len(images),) + shape, np.float32) if self._dequantize else None
        if flip or self._dequantize:
            for i, p in enumerate(positions):
                rng = np.random.default_rng([self.seed, tag, int(p)])
                if flip and rng.random() < 0.5:
                    images[i] = images[i, :, ::-1].copy()
                if self._dequantize:
                    noise[i] = rng.random(shape) - 0.5
        x = pad(images, self._pad_to).astype(np.float32)
        if self._dequantize:
            x += noise
        return x / 127.5 - 1.0

    def close(self) -> None:
        """Ends the decoding threads (a later batch starts them again)."""
        self._workers.close()

    def _shard(self, batch: dict) -> dict:
        return {k: np.asarray(v).reshape((self.local_device_count, -1) + v.shape[1:])
                for k, v in batch.items()}


def _check_batch_size(batch_size, process_count, local_device_count, name):
    devices = process_count * local_device_count
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % devices:
        raise ValueError(f"{name}={batch_size!r} must be a positive multiple of the number of devices "
                         f"(process_count * local_device_count = {process_count} * {local_device_count})")


def build_dataset(data_config, *, split: str, global_batch_size: int, seed: int,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  local_device_count: Optional[int] = None) -> Dataset:
    """The `split` of the data described by `data_config` (the config's `data` section).

    Every check (config fields, names, paths, batch divisibility) runs before any data
    is read. `process_index`, `process_count` and `local_device_count` default to
    jax.process_index(), jax.process_count() and jax.local_device_count().
    """
    cfg = validate_config(data_config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = jax.local_device_count() if local_device_count is None else local_device_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    _check_batch_size(global_batch_size, process_count, local_device_count, "global_batch_size")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")

    opened = REGISTRY[cfg.source].open(cfg, split)
    if cfg.conditional and not opened.num_classes:
        raise no_labels(f"{cfg.source} {cfg.name or cfg.path!r} has none")
    return Dataset(cfg=cfg, split=split, seed=int(seed), global_batch_size=int(global_batch_size),
                   process_index=process_index, process_count=process_count,
                   local_device_count=local_device_count, **opened._asdict())
