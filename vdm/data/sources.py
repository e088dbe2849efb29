"""The data sources, each an opener with its ``register`` line (and its config check) above it.

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
  unreadable later is replaced by the next readable one in the list and logged. Labels
  (``conditional``): each image's top-level sub-folder is its class, classes numbered in
  sorted name order (torchvision's ImageFolder).
* ``npz``: the array ``cfg.npz_key`` of the .npz file ``cfg.path``: uint8 [N, H, W(, C)]
  is image data, a float array [N, ...] is used as is (no scaling); labels from
  ``cfg.npz_label_key`` if set; held out as for digits.
* ``toy``: a distribution of ``vdm.toy_data`` (``cfg.name``); a Gaussian mixture's labels
  are its components. ``train`` is a fresh
  sample of the global batch every step, drawn from (seed, step), when
  ``num_points == 0``, else a fixed set of ``num_points`` points (seed 002 trains on
  1000); ``test`` is a fixed set of ``num_test`` points. Fixed sets are drawn from
  ``DATA_SEED``, so they are the same for every run seed.

``conditional`` needs a source with labels: digits, TFDS (checked when the builder is
opened: a ``label`` ClassLabel feature), npz with ``npz_label_key``, a toy Gaussian mixture;
each source's check refuses it otherwise.
"""
from __future__ import annotations

import pathlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from vdm import toy_data
from vdm.data.config import error, no_labels
from vdm.data.images import IMAGE_SUFFIXES, Folder, class_labels, fit_array, image_files, readable_image_files
from vdm.data.registry import Opened, register
from vdm.data.splits import DATA_SEED, SPLITS, TAG_TOY_TEST, TAG_TOY_TRAIN, holdout

# Finite sources: len() and load(indices) -> (x [n, ...], labels [n] or None).


class Arrays:
    def __init__(self, x: np.ndarray, labels: Optional[np.ndarray]):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def load(self, indices):
        return self.x[indices], None if self.labels is None else self.labels[indices]


class Tfds:
    def __init__(self, source, size: int, has_labels: bool):
        self.source, self.size, self.has_labels = source, size, has_labels

    def __len__(self):
        return len(self.source)

    def load(self, indices):
        examples = [self.source[int(i)] for i in indices]
        images = np.stack([fit_array(np.asarray(e["image"]), self.size) for e in examples])
        labels = np.array([e["label"] for e in examples]) if self.has_labels else None
        return images, labels


def _image_arrays(images, labels, cfg, field) -> Arrays:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise error(field, f"images must be [N, H, W] or [N, H, W, 1|3], got shape {images.shape}")
    if cfg.image_size:
        images = np.stack([fit_array(im, cfg.image_size) for im in images])
    return Arrays(images, labels)


@register("digits")
def open_digits(cfg, split) -> Opened:
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx = holdout(len(images), cfg.num_test, split, "digits")
    return Opened(_image_arrays(images[idx], digits.target[idx], cfg, "source"), None, 10, True, None)


def check_tfds(c) -> None:
    base = c.name.split(":")[0].split("/")[0]
    if not base or base not in tfds.list_builders(with_community_datasets=False):
        raise error("name", f"{c.name!r} is not a TFDS dataset (see tfds.list_builders(); "
                            "e.g. mnist, fashion_mnist, cifar10, celeb_a)")


@register("tfds", check=check_tfds)
def open_tfds(cfg, split) -> Opened:
    features = tfds.builder(cfg.name, data_dir=cfg.data_dir or None).info.features
    image = features["image"] if "image" in features else None
    if not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8:
        raise error("name", f"TFDS dataset {cfg.name!r} has no uint8 'image' feature "
                            f"(features: {list(features.keys())})")
    if cfg.image_size == 0 and None in image.shape[:2]:
        raise error("image_size", f"{cfg.name!r} images have no fixed size {image.shape}; set image_size > 0")
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    source = tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir or None)
    return Opened(Tfds(source, cfg.image_size, num_classes > 0), None, num_classes, True, None)


def check_folder(c) -> None:
    path = pathlib.Path(c.path)
    if not c.path or not path.is_dir():
        raise error("path", f"image folder {c.path!r} does not exist")
    if not image_files(path):
        raise error("path", f"no {'/'.join(IMAGE_SUFFIXES)} images under {c.path!r}")
    if c.image_size <= 0:
        raise error("image_size", f"must be > 0 for source='folder' (images are resized "
                                  f"and centre-cropped to it), got {c.image_size}")
    if c.channels not in (1, 3):
        raise error("channels", f"must be 1 (grey) or 3 (RGB), got {c.channels}")
    if c.conditional:
        try:
            _, names = class_labels(path, image_files(path))
        except ValueError as e:
            raise no_labels(f"source='folder' labels images by their class sub-folders: {e}")
        if len(names) < 2:
            raise no_labels(f"source='folder' labels images by their class sub-folders; {c.path!r} has "
                            f"{len(names)} ({list(names)})")


@register("folder", check=check_folder)
def open_folder(cfg, split) -> Opened:
    """The images; with ``conditional`` labelled by their class sub-folders (``class_labels``)."""
    files = readable_image_files(cfg)
    labels, names = class_labels(cfg.path, files) if cfg.conditional else (None, ())
    idx = holdout(len(files), cfg.num_test, split, "folder")
    return Opened(Folder([files[i] for i in idx], cfg.image_size, cfg.channels,
                         None if labels is None else labels[idx]), None, len(names), True, None)


def check_npz(c) -> None:
    path = pathlib.Path(c.path)
    if not c.path or not path.is_file():
        raise error("path", f".npz file {c.path!r} does not exist")
    with np.load(path) as f:
        keys = list(f.files)
    for field in ("npz_key", "npz_label_key"):
        if (c[field] or field == "npz_key") and c[field] not in keys:
            raise error(field, f"{c[field]!r} is not in {c.path!r}; its arrays: {keys}")
    if c.conditional and not c.npz_label_key:
        raise no_labels("source='npz' has labels only with config.data.npz_label_key set")


@register("npz", check=check_npz)
def open_npz(cfg, split) -> Opened:
    with np.load(cfg.path) as f:
        x = f[cfg.npz_key]
        labels = f[cfg.npz_label_key] if cfg.npz_label_key else None
    if labels is not None and (labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer)
                               or labels.min() < 0):
        raise error("npz_label_key", f"labels must be non-negative ints of shape ({len(x)},), "
                                     f"got {labels.dtype} {labels.shape}")
    num_classes = 0 if labels is None else int(labels.max()) + 1
    idx = holdout(len(x), cfg.num_test, split, "npz")
    labels = None if labels is None else labels[idx]
    if x.dtype == np.uint8:
        return Opened(_image_arrays(x[idx], labels, cfg, "npz_key"), None, num_classes, True, None)
    if not np.issubdtype(x.dtype, np.floating):
        raise error("npz_key", f"array must be uint8 images or floating data, got {x.dtype}")
    for field in ("image_size", "pad_to", "dequantize", "random_flip"):
        if cfg[field]:
            raise error(field, f"applies to uint8 images only; {cfg.npz_key!r} is {x.dtype} data")
    return Opened(Arrays(x[idx].astype(np.float32), labels), None, num_classes, False, None)


def check_toy(c) -> None:
    if c.name not in toy_data.TOY_DISTRIBUTIONS:
        raise error("name", f"unknown toy distribution {c.name!r}; "
                            f"allowed: {sorted(toy_data.TOY_DISTRIBUTIONS)}")
    for field in ("image_size", "pad_to"):
        if c[field]:
            raise error(field, "applies to images only; must be 0 for source='toy'")
    for field in ("dequantize", "random_flip"):
        if c[field]:
            raise error(field, "applies to 8-bit images only; must be False for source='toy'")
    if c.conditional and not toy_data.get(c.name).num_classes:
        labelled = sorted(n for n, d in toy_data.TOY_DISTRIBUTIONS.items() if d.num_classes)
        raise no_labels(f"toy distribution {c.name!r} has no labels "
                        f"(the Gaussian mixtures {labelled} do: their components)")


@register("toy", check=check_toy)
def open_toy(cfg, split) -> Opened:
    """``train``: fresh samples drawn per step (``num_points = 0``) or a fixed set; ``test``: a fixed set."""
    dist = toy_data.get(cfg.name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} for source='toy', got {split!r}")
    if split == "test" and cfg.num_test == 0:
        raise error("num_test", "is 0, so the toy source has no test split")
    size, tag = (cfg.num_points, TAG_TOY_TRAIN) if split == "train" else (cfg.num_test, TAG_TOY_TEST)
    # (x, labels): a mixture's component labels (toy_data.ToyDistribution.sample_labelled), else None
    sample = dist.sample_labelled or (lambda rng, n: (dist.sample(rng, n), None))
    examples = Arrays(*sample(np.random.default_rng([DATA_SEED, tag, 0]), size)) if size else None
    return Opened(examples, sample, dist.num_classes, False, dist.log_prob)
