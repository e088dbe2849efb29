"""A noise-conditional classifier p_phi(y | x_t, lambda) for classifier guidance.

The encoder half of the UNet (Dhariwal & Nichol 2021, §4 and App. C: "the downsampling
trunk of the UNet model with an attention pool at the 8x8 layer"; here a global mean
pool): a conv stem, per resolution level ``num_res_blocks`` ResBlocks (self-attention
where the feature map's height is in ``attn_resolutions``) and a stride-2 conv, the
middle ResBlock-attention-ResBlock, then GroupNorm, SiLU, the spatial mean and a linear
layer to ``num_classes`` logits. Every ResBlock receives the embedding of the noise level.

The noise level is always the log-SNR lambda of x_t (not a model's time variable), so a
classifier trained under one forward process conditions on a quantity every schedule
shares; ``time_range`` is the (log-SNR at the least noisy, at the most noisy) training level,
mapped to 0 and 1 before the sinusoidal embedding (``layers.TimeEmbedding``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vdm.models import layers


class NoisyClassifier(nn.Module):
    """``__call__(x_t [B, H, W, C], log_snr [B], train) -> logits [B, num_classes]`` (float32)."""
    num_classes: int = 10
    ch: int = 32
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    num_heads: int = 1
    num_groups: int = 8
    time_range: Sequence[float] = (10.0, -10.0)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this classifier cannot run on data of data_shape (H, W, C)."""
        layers.check_common(self, data_shape, image=True)
        layers.check_int("num_classes", self.num_classes, 2)
        layers.check_unet_levels(self, data_shape)

    learned_variance = False  # read by layers.check_common; a classifier has no variance output (not a field)

    @nn.compact
    def __call__(self, x, log_snr, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda out_ch: layers.ResBlock(out_ch, self.dropout, self.num_groups, **kw)
        attn = lambda: layers.AttnBlock(self.num_heads, self.num_groups, **kw)
        emb = layers.TimeEmbedding(self.ch, self.time_range, 0, **kw)(log_snr)

        h = layers.conv3x3(self.ch, **kw)(x)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.ch * mult)(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
            if level != len(self.ch_mult) - 1:
                h = layers.Downsample(**kw)(h)
        h = block(h.shape[-1])(h, emb, train)
        h = attn()(h)
        h = block(h.shape[-1])(h, emb, train)
        h = nn.silu(layers.group_norm(self.num_groups, **kw)(h)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=layers.default_init, **kw)(h).astype(jnp.float32)
