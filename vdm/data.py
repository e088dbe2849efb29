"""Every data source behind one batch interface.

Interface (all a training or evaluation loop needs)::

    from vdm import data
    cfg = data.default_config()      # the config's `data` section; set fields, e.g. cfg.source = "tfds"
    ds = data.build_dataset(cfg, split="train", global_batch_size=128, seed=0)
    batch = ds.get_batch(step)       # {"x": float32 [L, b, *ds.data_shape], "label": int32 [L, b]}
    for batch in ds.iterate_epoch(256):  # the split once, in order; adds "mask": bool [L, b]
        ...

``ds.close()`` ends the decoding threads of an image folder or TFDS source.
``L`` is the number of local devices and ``b = global_batch_size / (process_count * L)``.
``"label"`` is present iff ``ds.num_classes > 0``. Other attributes: ``data_shape``
(NHWC without the batch axis for images, ``(D,)`` for toy data), ``num_classes``,
``is_discrete_8bit`` (x lies on the 256-level grid ``k / 127.5 - 1``: an image source
with ``dequantize`` off; use the discretized decoder), ``num_examples`` (``None`` for an
infinite toy stream) and ``log_prob`` (the exact log-density of a toy distribution, a
jnp function ``x [..., D] -> [...]``, else ``None``).

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

Sources (``cfg.source``):

* ``digits`` (the default): scikit-learn's ``load_digits``, 1,797 8x8 scans with 17
  grey levels v in 0..16, mapped to 8 bits as round(v * 255 / 16), label = digit. Held
  out: a fixed permutation drawn from ``DATA_SEED`` (whatever the run seed)
  puts ``num_test`` examples (default 297, so 1500 train / 297 test) in ``test``.
* ``tfds``: any TFDS image dataset ``cfg.name`` (a builder of ``tfds.list_builders()``
  with a uint8 ``image`` feature), read with ``tfds.data_source(name, split=split,
  data_dir=cfg.data_dir)`` (random access to array_record files; downloads and prepares
  the data on first use). ``split`` is any TFDS split string. A ``label`` ClassLabel
  feature gives the labels.
* ``folder``: every .png/.jpg/.jpeg under ``cfg.path`` (recursive, sorted), converted to
  ``channels`` (3 RGB or 1 grey) and fitted to ``image_size`` (seed 001); held out as
  for digits. Every file is opened and decoded once, in parallel, when the data set is
  built (``check_image_files``): unreadable or non-image files stop the run with their
  names, or with ``skip_bad_files`` are left out with one warning. A file that becomes
  unreadable later is replaced by the next readable one in the list and logged.
* ``npz``: the array ``cfg.npz_key`` of the .npz file ``cfg.path``: uint8 [N, H, W(, C)]
  is image data, a float array [N, ...] is used as is (no scaling); labels from
  ``cfg.npz_label_key`` if set; held out as for digits.
* ``toy``: a distribution of ``vdm.toy_data`` (``cfg.name``); a Gaussian mixture's labels
  are its components. ``train`` is a fresh
  sample of the global batch every step, drawn from (seed, step), when
  ``num_points == 0``, else a fixed set of ``num_points`` points (seed 002 trains on
  1000); ``test`` is a fixed set of ``num_test`` points. Fixed sets are drawn from
  ``DATA_SEED``, so they are the same for every run seed.

Image scaling. Fitting to ``image_size`` (if > 0 and the image is not already that
size) scales the shorter side to ``image_size`` (bicubic, antialiased) and crops the
centre square; ``pad_to`` (if > 0) then pads with zeros (black, x = -1) to
``pad_to x pad_to``; ``random_flip`` flips training examples left-right with
probability 1/2. A pixel k in 0..255 becomes x = k / 127.5 - 1. With ``dequantize``,
x = (k + u - 1/2) / 127.5 - 1 with u ~ U(0, 1): uniform over the bin of width 2/255
centred on the grid point, the bin the discretized decoder integrates over (Ho et al.
2020, eq. 13). By Jensen, -log2 P(k) <= -log2 p(x) - D log2(2/255) for a continuous
density p, so bits/dim on the discrete data <= continuous bits/dim + log2(127.5).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
from typing import Iterator, Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from vdm import toy_data

SOURCES = ("digits", "tfds", "folder", "npz", "toy")
SPLITS = ("train", "test")  # of every source except tfds, which takes any TFDS split string
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DATA_SEED = 20240607  # fixes the held-out split and the toy point sets, whatever the run seed

# Every random stream is np.random.default_rng([seed, tag, n]) with a distinct tag >= 1 (a zero
# tag would collide: SeedSequence ignores trailing zeros, so [s, 0, 0] is the same as [s]).
(_TAG_HOLDOUT, _TAG_EPOCH, _TAG_TRAIN_EXAMPLE, _TAG_TOY_STEP, _TAG_EVAL_EXAMPLE, _TAG_TOY_TRAIN,
 _TAG_TOY_TEST) = range(1, 8)


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


def _error(field: str, message: str) -> ValueError:
    return ValueError(f"config.data.{field}: {message}")


def validate_config(cfg) -> ml_collections.ConfigDict:
    """Checks the `data` section without reading any data; returns it with defaults filled in.

    Raises ValueError naming the field for an unknown field or source, a TFDS name that
    `tfds.list_builders()` does not know, a toy name that does not exist, a missing
    folder / file / npz key, or a bad size.
    """
    full = default_config().to_dict()
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(full))
    if unknown:
        raise ValueError(f"config.data has unknown field(s) {unknown}; allowed: {sorted(full)}")
    c = ml_collections.ConfigDict({**full, **given})
    for field in ("source", "name", "data_dir", "path", "npz_key", "npz_label_key"):
        if not isinstance(c[field], str):
            raise _error(field, f"must be a string, got {c[field]!r}")

    if c.source not in SOURCES:
        raise _error("source", f"unknown source {c.source!r}; allowed: {list(SOURCES)}")
    for field in ("channels", "image_size", "pad_to", "num_points", "num_test", "workers"):
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < 0:
            raise _error(field, f"must be a non-negative int, got {c[field]!r}")
    for field in ("dequantize", "random_flip", "skip_bad_files", "conditional"):
        if not isinstance(c[field], bool):
            raise _error(field, f"must be True or False, got {c[field]!r}")

    if c.source == "tfds":
        base = c.name.split(":")[0].split("/")[0]
        if not base or base not in tfds.list_builders(with_community_datasets=False):
            raise _error("name", f"{c.name!r} is not a TFDS dataset (see tfds.list_builders(); "
                                 "e.g. mnist, fashion_mnist, cifar10, celeb_a)")
    if c.source == "toy":
        if c.name not in toy_data.TOY_DISTRIBUTIONS:
            raise _error("name", f"unknown toy distribution {c.name!r}; "
                                 f"allowed: {sorted(toy_data.TOY_DISTRIBUTIONS)}")
        for field in ("image_size", "pad_to"):
            if c[field]:
                raise _error(field, "applies to images only; must be 0 for source='toy'")
        for field in ("dequantize", "random_flip"):
            if c[field]:
                raise _error(field, "applies to 8-bit images only; must be False for source='toy'")
    if c.source == "folder":
        path = pathlib.Path(c.path)
        if not c.path or not path.is_dir():
            raise _error("path", f"image folder {c.path!r} does not exist")
        if not _image_files(path):
            raise _error("path", f"no {'/'.join(IMAGE_SUFFIXES)} images under {c.path!r}")
        if c.image_size <= 0:
            raise _error("image_size", f"must be > 0 for source='folder' (images are resized "
                                       f"and centre-cropped to it), got {c.image_size}")
        if c.channels not in (1, 3):
            raise _error("channels", f"must be 1 (grey) or 3 (RGB), got {c.channels}")
    if c.source == "npz":
        path = pathlib.Path(c.path)
        if not c.path or not path.is_file():
            raise _error("path", f".npz file {c.path!r} does not exist")
        with np.load(path) as f:
            keys = list(f.files)
        for field in ("npz_key", "npz_label_key"):
            if (c[field] or field == "npz_key") and c[field] not in keys:
                raise _error(field, f"{c[field]!r} is not in {c.path!r}; its arrays: {keys}")
    _check_labels_exist(c)
    return c


def _check_labels_exist(c) -> None:
    """``conditional`` needs a source with labels: digits, TFDS (checked when the builder is
    opened: a ``label`` ClassLabel feature), npz with ``npz_label_key``, a toy Gaussian mixture."""
    if not c.conditional:
        return
    why = None
    if c.source == "folder":
        why = "source='folder' has no labels"
    elif c.source == "npz" and not c.npz_label_key:
        why = "source='npz' has labels only with config.data.npz_label_key set"
    elif c.source == "toy" and not toy_data.get(c.name).num_classes:
        labelled = sorted(n for n, d in toy_data.TOY_DISTRIBUTIONS.items() if d.num_classes)
        why = f"toy distribution {c.name!r} has no labels (the Gaussian mixtures {labelled} do: their components)"
    if why:
        raise _error("conditional", f"True needs a data set with labels; {why}")


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# ---------------------------------------------------------------------------
# Image helpers (uint8 NHWC).
# ---------------------------------------------------------------------------


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Scales the shorter side to `size` (bicubic, antialiased) and crops the centre square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _fit_array(image: np.ndarray, size: int) -> np.ndarray:
    """fit_image for a uint8 [H, W, C] array (C = 1 or 3)."""
    if size == 0 or image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return np.asarray(fit_image(pil, size)).reshape(size, size, image.shape[-1])


def _pad(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads uint8 [N, H, W, C] images (centred) to [N, size, size, C]."""
    h, w = images.shape[1:3]
    if size == 0 or (h, w) == (size, size):
        return images
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def _holdout(n: int, num_test: int, split: str, source: str) -> np.ndarray:
    """Sorted indices of `split`: a fixed permutation of range(n) puts `num_test` of them in test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} for source={source!r}, got {split!r}")
    if split == "test" and num_test == 0:
        raise _error("num_test", f"is 0, so source={source!r} has no test split")
    if num_test >= n:
        raise _error("num_test", f"{num_test} leaves no training examples out of {n}")
    perm = np.random.default_rng([DATA_SEED, _TAG_HOLDOUT, 0]).permutation(n)
    return np.sort(perm[n - num_test:] if split == "test" else perm[: n - num_test])


# ---------------------------------------------------------------------------
# Finite sources: len() and load(indices) -> (x [n, ...], labels [n] or None).
# ---------------------------------------------------------------------------


class _Arrays:
    def __init__(self, x: np.ndarray, labels: Optional[np.ndarray]):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def load(self, indices):
        return self.x[indices], None if self.labels is None else self.labels[indices]


BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(path, mode: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image if image.mode == mode else image.convert(mode)


def _read_error(path, mode: str) -> Optional[str]:
    try:
        _decode(path, mode)
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_image_files(files, channels: int, workers: Optional[int] = None) -> dict:
    """{file: error} for every file of ``files`` that PIL cannot open and decode as an image,
    checked by a thread pool (decoding releases the GIL)."""
    mode = "RGB" if channels == 3 else "L"
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        errors = pool.map(lambda f: _read_error(f, mode), files)
        return {f: e for f, e in zip(files, errors) if e is not None}


_CHECKED_FOLDERS: dict = {}  # (files with size and mtime, channels, skip) -> readable files


def _readable_image_files(cfg) -> list:
    """The folder's image files after one decode pass (once per process while no file changes:
    the train and test splits share it); raises naming the bad files unless
    ``cfg.skip_bad_files``, which leaves them out with one warning."""
    files = _image_files(pathlib.Path(cfg.path))
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (stats, cfg.channels, cfg.skip_bad_files)
    if key not in _CHECKED_FOLDERS:
        bad = check_image_files(files, cfg.channels)
        listing = "\n".join(f"  {os.path.relpath(f, cfg.path)}: {e}" for f, e in bad.items())
        if bad and not cfg.skip_bad_files:
            raise _error("path", f"{len(bad)} of {len(files)} files under {cfg.path!r} are not readable "
                                 f"images:\n{listing}\nremove them, or set config.data.skip_bad_files=True "
                                 "to train without them")
        if bad:
            logging.warning("skipping %d of %d files under %r that are not readable images:\n%s",
                            len(bad), len(files), cfg.path, listing)
        good = [f for f in files if f not in bad]
        if not good:
            raise _error("path", f"none of the {len(files)} files under {cfg.path!r} is a readable image")
        _CHECKED_FOLDERS[key] = good
    return _CHECKED_FOLDERS[key]


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


class _Folder:
    """Images of a list of checked files. A file that fails to decode later (changed on disk)
    is logged once and replaced by the next readable file of the list."""

    def __init__(self, files, size: int, channels: int):
        self.files, self.size, self.mode = files, size, "RGB" if channels == 3 else "L"
        self.failed = set()

    def __len__(self):
        return len(self.files)

    def _image(self, i: int) -> np.ndarray:
        for j in range(len(self.files)):
            path = self.files[(i + j) % len(self.files)]
            if path in self.failed:
                continue
            try:
                fitted = fit_image(_decode(path, self.mode), self.size)
            except BAD_IMAGE_ERRORS as e:
                self.failed.add(path)
                logging.warning("skipping %s, which became unreadable during the run: %s: %s",
                                path, type(e).__name__, e)
                continue
            return np.asarray(fitted).reshape(self.size, self.size, -1)
        raise OSError(f"no file of the image folder is readable any more ({len(self.files)} files)")

    def load(self, indices):
        return np.stack([self._image(int(i)) for i in indices]), None


class _Tfds:
    def __init__(self, source, size: int, has_labels: bool):
        self.source, self.size, self.has_labels = source, size, has_labels

    def __len__(self):
        return len(self.source)

    def load(self, indices):
        examples = [self.source[int(i)] for i in indices]
        images = np.stack([_fit_array(np.asarray(e["image"]), self.size) for e in examples])
        labels = np.array([e["label"] for e in examples]) if self.has_labels else None
        return images, labels


def _image_array_source(images, labels, cfg, field):
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise _error(field, f"images must be [N, H, W] or [N, H, W, 1|3], got shape {images.shape}")
    if cfg.image_size:
        images = np.stack([_fit_array(im, cfg.image_size) for im in images])
    return _Arrays(images, labels)


def _open_source(cfg, split):
    """Returns (finite source with len() and load(indices), num_classes, is 8-bit image data)."""
    if cfg.source == "digits":
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        idx = _holdout(len(images), cfg.num_test, split, "digits")
        return _image_array_source(images[idx], digits.target[idx], cfg, "source"), 10, True

    if cfg.source == "npz":
        with np.load(cfg.path) as f:
            x = f[cfg.npz_key]
            labels = f[cfg.npz_label_key] if cfg.npz_label_key else None
        if labels is not None and (labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer)
                                   or labels.min() < 0):
            raise _error("npz_label_key", f"labels must be non-negative ints of shape ({len(x)},), "
                                          f"got {labels.dtype} {labels.shape}")
        num_classes = 0 if labels is None else int(labels.max()) + 1
        idx = _holdout(len(x), cfg.num_test, split, "npz")
        labels = None if labels is None else labels[idx]
        if x.dtype == np.uint8:
            return _image_array_source(x[idx], labels, cfg, "npz_key"), num_classes, True
        if not np.issubdtype(x.dtype, np.floating):
            raise _error("npz_key", f"array must be uint8 images or floating data, got {x.dtype}")
        for field in ("image_size", "pad_to", "dequantize", "random_flip"):
            if cfg[field]:
                raise _error(field, f"applies to uint8 images only; {cfg.npz_key!r} is {x.dtype} data")
        return _Arrays(x[idx].astype(np.float32), labels), num_classes, False

    if cfg.source == "folder":
        files = _readable_image_files(cfg)
        idx = _holdout(len(files), cfg.num_test, split, "folder")
        return _Folder([files[i] for i in idx], cfg.image_size, cfg.channels), 0, True

    if cfg.source == "tfds":
        features = tfds.builder(cfg.name, data_dir=cfg.data_dir or None).info.features
        image = features["image"] if "image" in features else None
        if not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8:
            raise _error("name", f"TFDS dataset {cfg.name!r} has no uint8 'image' feature "
                                 f"(features: {list(features.keys())})")
        if cfg.image_size == 0 and None in image.shape[:2]:
            raise _error("image_size", f"{cfg.name!r} images have no fixed size {image.shape}; "
                                       "set image_size > 0")
        label = features["label"] if "label" in features else None
        num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
        source = tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir or None)
        return _Tfds(source, cfg.image_size, num_classes > 0), num_classes, True

    raise AssertionError(cfg.source)  # validate_config admits only SOURCES


# ---------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------


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
            raise _error("pad_to", f"{cfg.pad_to} is smaller than the images {first.shape[1:3]}")
        self.data_shape = tuple(_pad(first, cfg.pad_to).shape[1:]) if is_8bit else tuple(first.shape[1:])

    # -- training batches ----------------------------------------------------

    def get_batch(self, step: int) -> dict:
        """The process's shard of the global batch of `step` (shuffled per epoch from the seed)."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        n = self.global_batch_size // self.process_count
        first = self.process_index * n
        if self._examples is None:
            rng = np.random.default_rng([self.seed, _TAG_TOY_STEP, int(step)])
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
        return self._batch(indices, positions, _TAG_TRAIN_EXAMPLE, self._flip)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs at a time
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, _TAG_EPOCH, epoch])
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
            batch = self._batch(np.where(mask, positions, 0), positions, _TAG_EVAL_EXAMPLE, False)
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
        shape = _pad(images[:1], self._pad_to).shape[1:]
        noise = np.zeros((len(images),) + shape, np.float32) if self._dequantize else None
        if flip or self._dequantize:
            for i, p in enumerate(positions):
                rng = np.random.default_rng([self.seed, tag, int(p)])
                if flip and rng.random() < 0.5:
                    images[i] = images[i, :, ::-1].copy()
                if self._dequantize:
                    noise[i] = rng.random(shape) - 0.5
        x = _pad(images, self._pad_to).astype(np.float32)
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

    common = dict(cfg=cfg, split=split, seed=int(seed), global_batch_size=int(global_batch_size),
                  process_index=process_index, process_count=process_count,
                  local_device_count=local_device_count)
    if cfg.source == "toy":
        dist = toy_data.get(cfg.name)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} for source='toy', got {split!r}")
        if split == "test" and cfg.num_test == 0:
            raise _error("num_test", "is 0, so the toy source has no test split")
        size, tag = (cfg.num_points, _TAG_TOY_TRAIN) if split == "train" else (cfg.num_test, _TAG_TOY_TEST)
        # (x, labels): a mixture's component labels (toy_data.ToyDistribution.sample_labelled), else None
        sample = dist.sample_labelled or (lambda rng, n: (dist.sample(rng, n), None))
        examples = None
        if size:
            examples = _Arrays(*sample(np.random.default_rng([DATA_SEED, tag, 0]), size))
        return Dataset(**common, examples=examples, sample=sample, num_classes=dist.num_classes, is_8bit=False,
                       log_prob=dist.log_prob)
    examples, num_classes, is_8bit = _open_source(cfg, split)
    if cfg.conditional and not num_classes:
        raise _error("conditional", f"True needs a data set with labels; {cfg.source} {cfg.name or cfg.path!r} "
                                    "has none")
    return Dataset(**common, examples=examples, sample=None, num_classes=num_classes, is_8bit=is_8bit,
                   log_prob=None)
