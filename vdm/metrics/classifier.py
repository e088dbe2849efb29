"""A small classifier trained on the data, whose penultimate features give a Fréchet distance
(``vdm.metrics.sample_quality.classifier_frechet_distance``); trained on first use and cached
in the workdir."""
from __future__ import annotations

import json
import os
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------
# A small classifier whose penultimate features give a Fréchet distance.
# ---------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small CNN for images [B, H, W, C] in [-1, 1]: three 3x3 conv layers (the last two
    with stride 2), global average pooling, a ``feature_dim`` ReLU layer (the features) and a
    linear classifier. Returns (logits, features)."""

    num_classes: int
    width: int = 32
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        h = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(h))
        h = nn.relu(nn.Conv(4 * self.width, (3, 3), strides=2)(h))
        features = nn.relu(nn.Dense(self.feature_dim)(h.mean(axis=(1, 2))))
        return nn.Dense(self.num_classes)(features), features


def train_classifier(key, batch_fn: Callable, num_classes: int, image_shape, num_steps: int,
                     learning_rate: float = 1e-3) -> tuple[dict, dict]:
    """Train ``FeatureClassifier`` with Adam on cross-entropy for ``num_steps`` steps.

    ``batch_fn(step) -> (images [B, H, W, C], labels [B])``. Returns (params,
    info) with info the last 50 steps' mean training loss and accuracy.
    """
    if num_classes < 2:
        raise ValueError(f"the feature classifier needs labelled data with >= 2 classes, got num_classes={num_classes}")
    model = FeatureClassifier(num_classes)
    params = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(logits.argmax(-1) == y)

    recent = []
    for i in range(num_steps):
        x, y = batch_fn(i)
        params, opt_state, loss, acc = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        recent = (recent + [(float(loss), float(acc))])[-50:]
    info = {"train_loss": float(np.mean([r[0] for r in recent])),
            "train_accuracy": float(np.mean([r[1] for r in recent]))}
    return jax.device_get(params), info


def _save_params(path: str, params, meta: dict) -> None:
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=json.dumps(meta), **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache


def _load_params(path: str) -> tuple[dict, dict]:
    with np.load(path) as f:
        meta = json.loads(str(f["__meta__"]))
        flat = {k: f[k] for k in f.files if k != "__meta__"}
    return flax.traverse_util.unflatten_dict(flat, sep="/"), meta


CLASSIFIER_FILE = "feature_classifier.npz"


def load_or_train_classifier(workdir: str, batch_fn: Callable, num_classes: int, image_shape, *,
                             num_steps: int = 1000, seed: int = 0, output: str = "features") -> Callable:
    """The feature map ``images [N, H, W, C] -> features [N, 128]`` of a classifier trained on
    the data set, cached as ``workdir/feature_classifier.npz``; with ``output="labels"`` its
    predicted labels [N] (the argmax of its logits) instead.

    On first use the classifier is trained (``train_classifier``, ``num_steps``
    batches from ``batch_fn``) and its parameters saved with their image shape
    and class count; later calls load them and never touch ``batch_fn``. A
    cache made for another image shape or class count is an error (delete the
    file to retrain).
    """
    path = os.path.join(workdir, CLASSIFIER_FILE)
    meta = {"image_shape": list(image_shape), "num_classes": int(num_classes)}
    if os.path.exists(path):
        params, saved = _load_params(path)
        if {k: saved.get(k) for k in meta} != meta:
            raise ValueError(f"{path} was trained for {({k: saved.get(k) for k in meta})}, not {meta}; "
                             "delete it to retrain the feature classifier")
    else:
        params, info = train_classifier(jax.random.PRNGKey(seed), batch_fn, num_classes, image_shape,
                                        num_steps)
        os.makedirs(workdir, exist_ok=True)
        _save_params(path, params, {**meta, **info, "num_steps": num_steps})
    if output not in ("features", "labels"):
        raise ValueError(f"output must be 'features' or 'labels', got {output!r}")
    model = FeatureClassifier(num_classes)
    if output == "features":
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
    else:
        apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x)[0], axis=-1))

    def features(images, batch_size: int = 500):
        images = np.asarray(images, np.float32)
        if images.shape[1:] != tuple(image_shape):
            raise ValueError(f"images must have shape [N, {', '.join(map(str, image_shape))}], got {images.shape}")
        return np.concatenate([np.asarray(apply(params, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    return features


def predicted_labels(workdir: str, images, num_classes: int, batch_size: int = 500) -> np.ndarray:
    """The argmax labels [N] of the feature classifier cached in ``workdir`` by
    ``load_or_train_classifier`` (call that first), for images [N, H, W, C]: the class of generated
    samples, e.g. to measure how often guided samples are of the requested class."""
    path = os.path.join(workdir, CLASSIFIER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: load_or_train_classifier trains and caches it")
    params, meta = _load_params(path)
    images = np.asarray(images, np.float32)
    if images.shape[1:] != tuple(meta["image_shape"]) or meta["num_classes"] != num_classes:
        raise ValueError(f"{path} was trained for images {meta['image_shape']} and {meta['num_classes']} "
                         f"classes, not {list(images.shape[1:])} and {num_classes}")
    model = FeatureClassifier(num_classes)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[0].argmax(-1))
    return np.concatenate([np.asarray(apply(params, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])
