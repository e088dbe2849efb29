"""The score network of Variational Diffusion Models (Kingma et al. 2021; their ScoreUNet).

A UNet without any downsampling: ``num_blocks`` ResNet blocks at full
resolution and constant width ``ch`` on the way "down", a middle
ResBlock-attention-ResBlock, and ``num_blocks + 1`` blocks on the way "up", each
fed the matching down-path activation as a skip connection. The input is
concatenated with its Fourier features sin/cos(2^n 2 pi x), which let the
network resolve the fine detail of the data at high SNR, and every
block is conditioned on the embedding of the normalised log-SNR. For CIFAR-10:
ch 128, 32 blocks, dropout 0.1, exponents n in {6, 7}, no attention outside the
middle, and the output adds the input (their "base measure" eps_pred += z).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vdm.models import layers, registry


@registry.register("vdm")
class VDMNet(nn.Module):
    """``__call__(x [B, H, W, C], t [B], cond [B] int or None, train) -> [B, H, W, C or 2C]``.

    t is normally the log-SNR: the default time_range (13.3, -5.0) maps
    log_snr = 13.3 (gamma_min = -13.3) to 0 and log_snr = -5 (gamma_max = 5) to 1.
    """
    ch: int = 128
    num_blocks: int = 32
    dropout: float = 0.1
    fourier_exponents: Sequence[int] = (6, 7)
    attention: bool = False
    num_heads: int = 1
    num_groups: int = 32
    input_skip: bool = True
    time_range: Sequence[float] = (13.3, -5.0)
    zero_init_output: bool = True
    learned_variance: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, data_shape):
        """Raise ValueError naming the field if this network cannot run on data of data_shape (H, W, C)."""
        layers.check_common(self, data_shape, image=True)
        layers.check_int("ch", self.ch)
        layers.check_embedding_dim("ch", self.ch)
        layers.check_int("num_blocks", self.num_blocks)
        layers.check_dropout(self.dropout)
        layers.check_ints("fourier_exponents", self.fourier_exponents, minimum=0, allow_empty=True)
        layers.check_bool("attention", self.attention)
        layers.check_bool("input_skip", self.input_skip)
        layers.check_bool("zero_init_output", self.zero_init_output)
        layers.check_int("num_heads", self.num_heads)
        layers.check_int("num_groups", self.num_groups)
        layers.check_divides("num_groups", self.num_groups, [self.ch], "channel count")
        layers.check_divides("num_heads", self.num_heads, [self.ch], "channel count")

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda: layers.ResBlock(self.ch, self.dropout, self.num_groups, **kw)
        attn = lambda: layers.AttnBlock(self.num_heads, self.num_groups, **kw)
        emb = layers.TimeEmbedding(self.ch, self.time_range, self.num_classes, **kw)(t, cond)

        h = x
        if self.fourier_exponents:
            h = jnp.concatenate([x, layers.fourier_features(x, self.fourier_exponents)], axis=-1)
        hs = [layers.conv3x3(self.ch, **kw)(h)]
        for _ in range(self.num_blocks):
            h = block()(hs[-1], emb, train)
            hs.append(attn()(h) if self.attention else h)

        h = block()(hs[-1], emb, train)
        h = attn()(h)
        h = block()(h, emb, train)

        for _ in range(self.num_blocks + 1):
            h = block()(jnp.concatenate([h, hs.pop()], axis=-1), emb, train)
            if self.attention:
                h = attn()(h)

        out_ch = x.shape[-1] * (2 if self.learned_variance else 1)
        out = layers.OutputHead(out_ch, self.num_groups, self.zero_init_output, **kw)(h)
        if self.input_skip:
            out = out.at[..., : x.shape[-1]].add(x)
        return out
