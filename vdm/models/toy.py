"""Networks for 1-D and 2-D toy data x [B, D].

- ``MLP``: a time-conditioned MLP (sinusoidal embedding of t concatenated to x).
- ``PerStepHeads``: seed 003's Swiss-roll network: a shared ReLU trunk and one
  output head per timestep t = 1..T (t is the int32 step, selecting head t-1).
- ``MeanVarNets``: seed 002's two separate one-hidden-layer networks on
  (x, normalised t), one for the reverse mean, one for the variance.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vdm.models import layers, registry


@registry.register("mlp")
class MLP(nn.Module):
    """``__call__(x [B, D], t [B], cond [B] int or None, train) -> [B, D or 2D]``.

    Input: x concatenated with the sinusoidal embedding (width ``embed_dim``) of
    normalise_time(t) * 1000 and, with num_classes > 0, a class embedding (label
    ``num_classes`` is the null class); ``depth`` SiLU layers of ``hidden`` units.
    """
    hidden: int = 128
    depth: int = 3
    embed_dim: int = 32
    time_range: Sequence[float] = (0.0, 1.0)
    learned_variance: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this network cannot run on data of data_shape (D,)."""
        layers.check_common(self, data_shape, image=False)
        layers.check_int("hidden", self.hidden)
        layers.check_int("depth", self.depth)
        layers.check_int("embed_dim", self.embed_dim)
        layers.check_embedding_dim("embed_dim", self.embed_dim)

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = [x, layers.sinusoidal_embedding(layers.normalise_time(t, self.time_range) * layers.TIME_SCALE,
                                                self.embed_dim)]
        labels = layers.class_labels(cond, x.shape[0], self.num_classes)
        if labels is not None:
            feats.append(nn.Embed(self.num_classes + 1, self.embed_dim, name="class_embedding", **kw)(labels))
        h = jnp.concatenate(feats, axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.hidden, **kw)(h))
        out = nn.Dense(x.shape[-1] * (2 if self.learned_variance else 1), **kw)(h)
        return out.astype(jnp.float32)


@registry.register("per_step_heads")
class PerStepHeads(nn.Module):
    """Seed 003 (Swiss roll, T = 40): trunk Dense-ReLU-Dense-ReLU, then head t-1 = Dense-ReLU-Dense.

    ``__call__(x [B, D], t [B] int32 in 1..num_steps, ...) -> [B, D or 2D]``; with
    learned_variance the second half is the head's log-variance output. The
    heads' weights are stacked along a leading axis of length num_steps and
    gathered per example, so a batch may mix timesteps.
    """
    num_steps: int = 40
    hidden: int = 128
    learned_variance: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this network cannot run on data of data_shape (D,)."""
        layers.check_common(self, data_shape, image=False)
        layers.check_int("num_steps", self.num_steps)
        layers.check_int("hidden", self.hidden)
        if self.num_classes:
            layers.fail("num_classes", "per_step_heads has no class conditioning; use 0")

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        if not jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
            raise ValueError(f"PerStepHeads takes the int32 timestep t in 1..{self.num_steps}, got dtype {t.dtype}")
        layers.class_labels(cond, x.shape[0], self.num_classes)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(nn.Dense(self.hidden, **kw)(x))
        h = nn.relu(nn.Dense(self.hidden, **kw)(h))
        out = x.shape[-1] * (2 if self.learned_variance else 1)
        head = t - 1
        h = nn.relu(self._head_layer("head_hidden", h, head, self.hidden))
        return self._head_layer("head_out", h, head, out).astype(jnp.float32)

    def _head_layer(self, name, h, head, features):
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        kernel = self.param(f"{name}_kernel", init, (self.num_steps, h.shape[-1], features), self.param_dtype)
        bias = self.param(f"{name}_bias", nn.initializers.zeros, (self.num_steps, features), self.param_dtype)
        h = h.astype(self.dtype)
        return jnp.einsum("bi,bio->bo", h, kernel[head].astype(self.dtype)) + bias[head].astype(self.dtype)


@registry.register("mean_var_nets")
class MeanVarNets(nn.Module):
    """Seed 002 (1-D mixture, T = 250): mean net and variance net, each Dense(hidden)-ReLU-Dense(D).

    Both read (x, normalise_time(t)). Output [B, 2D]: the mean net's output, then
    the variance net's (a log-variance for variance type 'learned'); the network
    exists only with a learned variance.
    """
    hidden: int = 4
    learned_variance: bool = True
    num_classes: int = 0
    time_range: Sequence[float] = (0.0, 1.0)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this network cannot run on data of data_shape (D,)."""
        layers.check_common(self, data_shape, image=False)
        layers.check_int("hidden", self.hidden)
        if not self.learned_variance:
            layers.fail("name", "mean_var_nets predicts a variance: it needs a learned variance type "
                                "('learned' or 'learned_range')")
        if self.num_classes:
            layers.fail("num_classes", "mean_var_nets has no class conditioning; use 0")

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        layers.class_labels(cond, x.shape[0], self.num_classes)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jnp.concatenate([x, layers.normalise_time(t, self.time_range)[:, None]], axis=-1)
        net = lambda name: nn.Dense(x.shape[-1], name=f"{name}_out", **kw)(
            nn.relu(nn.Dense(self.hidden, name=f"{name}_hidden", **kw)(h)))
        return jnp.concatenate([net("mean"), net("var")], axis=-1).astype(jnp.float32)
