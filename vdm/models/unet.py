"""The UNet of Ho et al. 2020 (App. B; their diffusion_tf/models/unet.py), in Flax linen, NHWC.

A conv stem, then per resolution level ``num_res_blocks`` wide-ResNet blocks
(with self-attention where the feature map's height is in ``attn_resolutions``)
and a stride-2 downsampling conv; a middle ResBlock-attention-ResBlock; the
mirror-image upsampling path with ``num_res_blocks + 1`` blocks per level, each
taking the matching down-path activation as a skip connection; GroupNorm, SiLU
and a 3x3 output conv. Every ResBlock receives the embedding of t (and of the
class label). With ch=128, ch_mult=(1, 2, 2, 2), 2 blocks and attention at 16x16
it is the 35.7M-parameter CIFAR-10 network of the paper.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vdm.models import layers, registry


@registry.register("unet")
class UNet(nn.Module):
    """``__call__(x [B, H, W, C], t [B], cond [B] int or None, train) -> [B, H, W, C or 2C]``.

    t is embedded after ``layers.normalise_time(t, time_range)``; label
    ``num_classes`` is the null class (see ``layers.TimeEmbedding``).
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    num_groups: int = 32
    time_range: Sequence[float] = (0.0, 1.0)
    zero_init_output: bool = True
    learned_variance: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this network cannot run on data of data_shape (H, W, C)."""
        layers.check_common(self, data_shape, image=True)
        layers.check_unet_levels(self, data_shape)
        layers.check_bool("zero_init_output", self.zero_init_output)

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda out_ch: layers.ResBlock(out_ch, self.dropout, self.num_groups, **kw)
        attn = lambda: layers.AttnBlock(self.num_heads, self.num_groups, **kw)
        emb = layers.TimeEmbedding(self.ch, self.time_range, self.num_classes, **kw)(t, cond)

        hs = [layers.conv3x3(self.ch, **kw)(x)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.ch * mult)(hs[-1], emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                hs.append(layers.Downsample(**kw)(hs[-1]))

        h = hs[-1]
        h = block(h.shape[-1])(h, emb, train)
        h = attn()(h)
        h = block(h.shape[-1])(h, emb, train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = block(self.ch * mult)(jnp.concatenate([h, hs.pop()], axis=-1), emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
            if level != 0:
                h = layers.Upsample(**kw)(h)

        out_ch = x.shape[-1] * (2 if self.learned_variance else 1)
        return layers.OutputHead(out_ch, self.num_groups, self.zero_init_output, **kw)(h)
