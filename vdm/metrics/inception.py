"""InceptionV3 pool3 features for FID (Heusel et al. 2017), with weights supplied by the user.

The network is the TensorFlow FID model as ported by pytorch-fid; its state dict is
read from an .npz (``INCEPTION_WEIGHTS_HELP``). Nothing is downloaded at run time.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# InceptionV3 pool3 features for FID (weights supplied by the user).
# ---------------------------------------------------------------------------

INCEPTION_WEIGHTS_HELP = (
    "FID needs the InceptionV3 weights of the TensorFlow FID model as ported by pytorch-fid "
    "(pt_inception-2015-12-05-6726825d.pth), converted once to an .npz of its state dict with "
    "the PyTorch parameter names as keys, e.g.\n"
    "  python -c \"import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); "
    "np.savez('inception_fid.npz', **{k: v.numpy() for k, v in sd.items()})\"\n"
    "Nothing is downloaded at run time.")


class _BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _conv(name, features, kernel, strides=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return _BasicConv(features, kernel, strides, padding, name=name)


def _avg_pool_same(x):
    """3x3 stride-1 average pool without counting the zero padding (TensorFlow's, pytorch-fid)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class _InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 64, 1)(x)
        b5 = _conv("branch5x5_2", 64, 5, padding=2)(_conv("branch5x5_1", 48, 1)(x))
        b3 = _conv("branch3x3dbl_1", 64, 1)(x)
        b3 = _conv("branch3x3dbl_3", 96, 3, padding=1)(_conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = _conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class _InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3", 384, 3, strides=2)(x)
        bd = _conv("branch3x3dbl_1", 64, 1)(x)
        bd = _conv("branch3x3dbl_3", 96, 3, strides=2)(_conv("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], -1)


class _InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = _conv("branch1x1", 192, 1)(x)
        b7 = _conv("branch7x7_1", c, 1)(x)
        b7 = _conv("branch7x7_2", c, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = _conv("branch7x7dbl_1", c, 1)(x)
        bd = _conv("branch7x7dbl_2", c, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_3", c, (1, 7), padding=(0, 3))(bd)
        bd = _conv("branch7x7dbl_4", c, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = _conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class _InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3_2", 320, 3, strides=2)(_conv("branch3x3_1", 192, 1)(x))
        b7 = _conv("branch7x7x3_1", 192, 1)(x)
        b7 = _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = _conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], -1)


class _InceptionE(nn.Module):
    """``max_pool``: the second E block of the FID network pools by max, not average (pytorch-fid)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 320, 1)(x)
        b3 = _conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([_conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              _conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = _conv("branch3x3dbl_2", 384, 3, padding=1)(_conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([_conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              _conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool
                  else _avg_pool_same(x))
        bp = _conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """The FID InceptionV3 (Szegedy et al. 2016; the TensorFlow FID graph as in pytorch-fid) up
    to pool3: images [N, H, W, C] in [-1, 1] (C = 1 is repeated to RGB) are resized bilinearly
    to 299 x 299 and mapped to 2048-d features. Submodule names follow torchvision's, so the
    weights load by name (``load_inception_variables``)."""

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
        x = _conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool_valid(_conv("Conv2d_2b_3x3", 64, 3, padding=1)(x))
        x = _conv("Conv2d_3b_1x1", 80, 1)(x)
        x = _max_pool_valid(_conv("Conv2d_4a_3x3", 192, 3)(x))
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = _InceptionC(c7, name=name)(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


# Flax leaf -> (PyTorch parameter suffix, transform of the PyTorch array).
_TORCH_NAMES = {
    ("params", "conv", "kernel"): ("conv.weight", lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    ("params", "bn", "scale"): ("bn.weight", lambda w: w),
    ("params", "bn", "bias"): ("bn.bias", lambda w: w),
    ("batch_stats", "bn", "mean"): ("bn.running_mean", lambda w: w),
    ("batch_stats", "bn", "var"): ("bn.running_var", lambda w: w),
}


@functools.lru_cache(maxsize=1)
def _inception_shapes() -> dict:
    return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))


def load_inception_variables(path: str) -> dict:
    """Flax variables of ``InceptionV3`` from an .npz of the pytorch-fid state dict (see
    ``INCEPTION_WEIGHTS_HELP``). Keys the network does not use (fc.*, num_batches_tracked)
    are ignored; a missing file, a missing key or a wrong shape is an error naming it."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path!r}.\n{INCEPTION_WEIGHTS_HELP}")
    shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(_inception_shapes()))
    flat = {}
    with np.load(path) as f:
        for key, shape in shapes.items():
            collection, *modules, layer, leaf = key
            suffix, transform = _TORCH_NAMES[(collection, layer, leaf)]
            torch_name = ".".join(modules + [suffix])
            if torch_name not in f.files:
                raise ValueError(f"{path} has no array {torch_name!r}.\n{INCEPTION_WEIGHTS_HELP}")
            value = transform(np.asarray(f[torch_name], np.float32))
            if value.shape != shape.shape:
                raise ValueError(f"{path}: {torch_name!r} has shape {value.shape} after conversion, "
                                 f"expected {shape.shape}")
            flat[key] = value
    return flax.traverse_util.unflatten_dict(flat)


def inception_features(weights_path: str, batch_size: int = 100) -> Callable:
    """``images [N, H, W, C] in [-1, 1] -> pool3 features [N, 2048]`` of the FID InceptionV3
    with weights from ``weights_path`` (``load_inception_variables``)."""
    variables = load_inception_variables(weights_path)
    apply = jax.jit(lambda v, x: InceptionV3().apply(v, x))

    def features(images):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
        return np.concatenate([np.asarray(apply(variables, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    return features
