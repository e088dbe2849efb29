"""Building blocks of the image networks: embeddings, ResBlock, attention, resampling.

All layers are NHWC and take ``dtype`` (compute dtype, e.g. bfloat16) and
``param_dtype`` (float32). GroupNorm computes its statistics in float32 whatever
the compute dtype, and the attention softmax runs in float32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.models import cpu_conv, cpu_dense

Dtype = Any

# Ho et al. 2020's default initialiser (their nn.py): variance scaling 1, fan_avg, uniform.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

TIME_SCALE = 1000.0  # normalised time in [0, 1] is embedded as if it were a step 0..1000


def sinusoidal_embedding(x, dim: int, max_period: float = 10000.0):
    """Transformer position encoding of a real x [B] -> [B, dim] (Vaswani et al. 2017 §3.5).

    As in Ho et al. 2020 (App. B) and tensor2tensor: frequencies
    max_period^(-k / (dim/2 - 1)), k = 0..dim/2-1, sines then cosines.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def normalise_time(t, time_range: Sequence[float]):
    """Affine map of the conditioning value t sending time_range[0] -> 0 and time_range[1] -> 1.

    With time_range = (0, 1) t is continuous time; (0, T) takes integer steps;
    (log_snr_max, log_snr_min) takes a log-SNR, which gives VDM's normalised
    gamma (Kingma et al. 2021's ScoreUNet: (gamma - gamma_min) / (gamma_max - gamma_min)).
    """
    lo, hi = time_range
    return (jnp.asarray(t, jnp.float32) - lo) / (hi - lo)


def fourier_features(x, exponents: Sequence[int]):
    """sin(2^n 2 pi x), cos(2^n 2 pi x) for n in exponents, channel-wise (Kingma et al. 2021, Fourier features).

    x [..., C] -> [..., 2 C len(exponents)]; exponents (6, 7) are VDM's CIFAR-10 choice.
    """
    w = 2.0 * jnp.pi * 2.0 ** jnp.asarray(exponents, jnp.float32)
    h = (jnp.asarray(x, jnp.float32)[..., None] * w).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def class_labels(cond, batch: int, num_classes: int):
    """The label array a network embeds: cond, or the null class ``num_classes`` where cond is None.

    None when the network has no class conditioning (num_classes = 0). Checked at trace time.
    """
    if num_classes == 0:
        if cond is not None:
            raise ValueError("cond was given but the network was built with num_classes=0")
        return None
    if cond is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    if not jnp.issubdtype(jnp.asarray(cond).dtype, jnp.integer):
        raise ValueError(f"cond must be an integer class label array, got dtype {jnp.asarray(cond).dtype}")
    return cond


class TimeEmbedding(nn.Module):
    """Conditioning vector [B, 4 ch] from t (and a class label).

    Sinusoidal embedding of normalise_time(t) * 1000 followed by a two-layer MLP
    (Ho et al. 2020, App. B). With num_classes > 0 a learned class embedding is
    added; label ``num_classes`` is the null class (no label) used for
    classifier-free guidance (Ho & Salimans 2022), and ``cond=None`` means it.
    """
    ch: int
    time_range: Sequence[float] = (0.0, 1.0)
    num_classes: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, cond=None):
        dense = lambda n: nn.Dense(n, kernel_init=default_init, dtype=self.dtype, param_dtype=self.param_dtype)
        emb = sinusoidal_embedding(normalise_time(t, self.time_range) * TIME_SCALE, self.ch)
        emb = dense(4 * self.ch)(nn.silu(dense(4 * self.ch)(emb)))
        labels = class_labels(cond, t.shape[0], self.num_classes)
        if labels is not None:
            emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="class_embedding")(labels)
        return emb


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over the spatial axes and the channels of each group:
    y = (x - mean) / sqrt(var + epsilon) * scale + bias, var = E[x^2] - mean^2 clipped at 0.

    The parameters ("scale", "bias", [C]) and the values are ``flax.linen.GroupNorm``'s (statistics
    in float32 or wider, output in ``dtype``); only the order of the sums differs. Each statistic
    is a sum over the spatial axes per channel, [N, C], and then over the channels of each group,
    [N, G]: XLA:CPU runs these two reductions, and those of the backward pass, through YNNPACK far
    faster than flax's one reduction over the spatial axes and the channels of a group at once
    (GroupNorm + SiLU forward and backward 1.8-4.6x faster on one core; docs/performance.md item 19).
    """
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: num_groups={self.num_groups} does not divide the {channels} channels")
        group_size = channels // self.num_groups
        spatial_axes = tuple(range(1, x.ndim - 1))
        count = group_size * math.prod(x.shape[1:-1])
        stats = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))

        def group_mean(values):
            per_channel = values.sum(spatial_axes)                                       # [N, C]
            per_group = per_channel.reshape(-1, self.num_groups, group_size).sum(-1) / count
            return jnp.expand_dims(jnp.repeat(per_group, group_size, axis=-1), spatial_axes)

        mean = group_mean(stats)
        var = jnp.maximum(0.0, group_mean(stats * stats) - mean * mean)
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype):
    return GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)


def conv3x3(features: int, dtype: Dtype, param_dtype: Dtype, strides: int = 1, kernel_init=default_init):
    """3x3 'SAME' convolution; on CPU through ``cpu_conv.conv_nhwc`` (GPUs/TPUs keep XLA's own gradients)."""
    conv = cpu_conv.conv_general_dilated if jax.default_backend() == "cpu" else None
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding="SAME", kernel_init=kernel_init,
                   dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv)


def token_dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
    """Dense layer applied at every position of a [B, H, W, C] map (a 1x1 convolution); on CPU through
    ``cpu_dense.dense``, whose kernel gradient (contracting B*H*W) XLA:CPU runs in YNNPACK."""
    dot_general = cpu_dense.dot_general if jax.default_backend() == "cpu" else None
    return nn.Dense(features, kernel_init=default_init, dtype=dtype, param_dtype=param_dtype, name=name,
                    dot_general=dot_general)


class ResBlock(nn.Module):
    """Wide-ResNet block with the conditioning vector added after the first conv.

    GroupNorm -> SiLU -> conv3x3 -> + Dense(SiLU(emb)) -> GroupNorm -> SiLU ->
    dropout -> conv3x3, plus a 1x1 (Dense) shortcut when the channel count
    changes (Ho et al. 2020, App. B; their resnet_block).
    """
    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.num_groups, **kw)(x))
        h = conv3x3(self.out_ch, **kw)(h)
        h = h + nn.Dense(self.out_ch, kernel_init=default_init, **kw)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(group_norm(self.num_groups, **kw)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = token_dense(self.out_ch, name="shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Residual multi-head self-attention over the H*W positions (Ho et al. 2020, App. B).

    GroupNorm -> one fused q/k/v projection -> softmax(q k^T / sqrt(d)) v ->
    output projection, added to the input.
    """
    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.num_groups, **kw)(x)
        qkv = token_dense(3 * C, name="qkv", **kw)(h)
        q, k, v = jnp.split(qkv.reshape(B, H * W, 3 * self.num_heads, C // self.num_heads), 3, axis=2)
        h = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)
        return x + token_dense(C, name="proj_out", **kw)(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (Ho et al. 2020's downsample with_conv=True)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv3x3(x.shape[-1], self.dtype, self.param_dtype, strides=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (Ho et al. 2020)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return conv3x3(C, self.dtype, self.param_dtype)(x)


class OutputHead(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv to the output channels, returned in float32.

    ``zero_init`` starts the conv at zero so the untrained network outputs 0
    (Ho et al. 2020 initialise their conv_out with scale ~0).
    """
    out_ch: int
    num_groups: int = 32
    zero_init: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = nn.silu(group_norm(self.num_groups, self.dtype, self.param_dtype)(h))
        init = nn.initializers.zeros if self.zero_init else default_init
        return conv3x3(self.out_ch, self.dtype, self.param_dtype, kernel_init=init)(h).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Field checks shared by the networks' ``check(data_shape)`` methods. They run
# on plain Python values, before anything is traced or compiled.
# ---------------------------------------------------------------------------


def fail(field: str, message: str):
    raise ValueError(f"model.{field}: {message}")


def check_int(field: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, f"must be an integer >= {minimum}, got {value!r}")


def check_bool(field: str, value):
    if not isinstance(value, bool):
        fail(field, f"must be True or False, got {value!r}")


def check_ints(field: str, value, minimum: int = 1, allow_empty: bool = False):
    if not isinstance(value, tuple) or not (value or allow_empty):
        fail(field, f"must be a {'' if allow_empty else 'non-empty '}tuple of integers, got {value!r}")
    for v in value:
        check_int(field, v, minimum)


def _dtype_name(value) -> str | None:
    try:
        return jnp.dtype(value).name
    except TypeError:
        return None


def check_common(net, data_shape, image: bool):
    """Checks every network shares: data rank, time_range, dtypes, num_classes, learned_variance."""
    rank = 3 if image else 1
    if len(tuple(data_shape)) != rank or any(not isinstance(d, int) or d < 1 for d in data_shape):
        kind = "an image shape (H, W, C)" if image else "a vector shape (D,)"
        fail("name", f"network {type(net).__name__} needs {kind}, got data_shape={tuple(data_shape)!r}")
    if hasattr(net, "time_range"):  # PerStepHeads has none: its t selects a head
        tr = tuple(net.time_range)
        if len(tr) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in tr) or tr[0] == tr[1]:
            fail("time_range", f"must be two distinct finite numbers (the values mapped to 0 and to 1), "
                               f"got {net.time_range!r}")
    if _dtype_name(net.dtype) not in ("float32", "bfloat16"):
        fail("dtype", f"must be 'float32' or 'bfloat16', got {net.dtype!r}")
    if _dtype_name(net.param_dtype) != "float32":
        fail("param_dtype", f"must be 'float32', got {net.param_dtype!r}")
    check_int("num_classes", net.num_classes, 0)
    check_bool("learned_variance", net.learned_variance)


def check_dropout(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        fail("dropout", f"must be a rate in [0, 1), got {value!r}")


def check_divides(field: str, value: int, channels: Sequence[int], what: str):
    bad = sorted({c for c in channels if c % value})
    if bad:
        fail(field, f"{value} must divide the {what} of every layer it applies to; it does not divide {bad}")


def check_embedding_dim(field: str, value: int):
    if value < 4 or value % 2:
        fail(field, f"is the sinusoidal embedding width and must be even and >= 4, got {value}")


def check_unet_levels(module, data_shape) -> None:
    """The fields of a UNet's level structure (``ch``, ``ch_mult``, ``num_res_blocks``,
    ``attn_resolutions``, ``dropout``, ``num_heads``, ``num_groups``) against data of
    ``data_shape`` (H, W, C): every halving divides H and W, every attention resolution is
    reached, and the group and head counts divide the channel counts where they apply."""
    check_int("ch", module.ch)
    check_embedding_dim("ch", module.ch)
    check_ints("ch_mult", module.ch_mult)
    check_int("num_res_blocks", module.num_res_blocks)
    check_ints("attn_resolutions", module.attn_resolutions, allow_empty=True)
    check_dropout(module.dropout)
    check_int("num_heads", module.num_heads)
    check_int("num_groups", module.num_groups)
    H, W, _ = data_shape
    factor = 2 ** (len(module.ch_mult) - 1)
    if H % factor or W % factor:
        fail("ch_mult", f"{len(module.ch_mult)} levels halve the image {len(module.ch_mult) - 1} times, so "
                        f"H and W must be divisible by {factor}; got {H}x{W} (pad the data)")
    reached = [H // 2 ** i for i in range(len(module.ch_mult))]
    never = [r for r in module.attn_resolutions if r not in reached]
    if never:
        fail("attn_resolutions", f"{never} never reached; the feature-map heights are {reached}")
    widths = [module.ch] + [module.ch * m for m in module.ch_mult]
    check_divides("num_groups", module.num_groups, widths, "channel count")
    attended = [module.ch * m for m, r in zip(module.ch_mult, reached) if r in module.attn_resolutions]
    check_divides("num_heads", module.num_heads, attended + [module.ch * module.ch_mult[-1]],
                  "channel count of the attention layers")
