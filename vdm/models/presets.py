"""Complete ``model`` config sections for the papers' and reference implementations' networks.

Named for what they are (paper or codebase, network, width); where a preset reproduces
the network of one of the project's seed documents, its docstring says which.

Each function returns a fresh ml_collections ConfigDict for ``build_model``;
override fields as usual (``--config.model.ch=64``). ``time_range`` is left to
the networks' defaults here: the training code sets it from the diffusion
section (what t the network receives).
"""
from __future__ import annotations

import ml_collections


def _section(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def _unet(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups=32, num_heads=1):
    return _section(name="unet", ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                    attn_resolutions=tuple(attn_resolutions), dropout=dropout, num_heads=num_heads,
                    num_groups=num_groups, zero_init_output=True, dtype="float32")


def ddpm_cifar10():
    """Ho et al. 2020, CIFAR-10 32x32: ch 128, mults (1, 2, 2, 2), 2 blocks, attention at 16x16,
    dropout 0.1; 35.7M parameters."""
    return _unet(128, (1, 2, 2, 2), 2, (16,), 0.1)


def adm64_unet256():
    """A ~0.5B-parameter UNet for scaling and memory tests: the layout of ADM's ImageNet 64x64
    model (Dhariwal & Nichol 2021: ch_mult (1, 2, 3, 4), 3 blocks per level, attention at 32,
    16 and 8 pixels, dropout 0.1) widened from 192 to 256 channels, 4 heads; 471M parameters at
    64x64 with an eps output. Not a paper's network: it sizes the FSDP figures in
    docs/performance.md (its Adam state does not fit replicated on a 16 GB chip)."""
    return _unet(256, (1, 2, 3, 4), 3, (32, 16, 8), 0.1, num_heads=4)


def mnist_unet128():
    """The MNIST UNet of width 128 of tonyduan/diffusion (UNet(embed_dim=128, dim_scales=(1, 2, 4, 8)))
    on MNIST padded to 32x32 (its input_shape; three halvings need a size divisible by 8); seed
    004's network (formerly ``mnist_seed004``).

    Its dim_scales are the widths *after* each level's down-sampling conv, so its blocks run
    at 128 x (1, 1, 2, 4) at 32, 16, 8, 4 pixels: ch_mult (1, 1, 2, 4) here (taking (1, 2, 4, 8)
    literally would give 226M parameters). Attention only in the middle, as there.
    """
    return _unet(128, (1, 1, 2, 4), 2, (), 0.0)


def lucidrains_unet64(image_size: int = 128):
    """lucidrains' denoising_diffusion_pytorch Unet(dim=64, dim_mults=(1, 2, 4, 8)) for 128x128
    images, 8 GroupNorm groups as there; seed 001's starter network (formerly ``seed001_unet``).
    As for ``mnist_unet128``, the dim_mults are the widths after each level's down-sampling, so the
    blocks run at 64 x (1, 1, 2, 4): ch_mult (1, 1, 2, 4).
    Attention at the lowest resolution, image_size // 8.
    """
    return _unet(64, (1, 1, 2, 4), 2, (image_size // 8,), 0.0, num_groups=8)


def vdm_cifar10():
    """Kingma et al. 2021, CIFAR-10 (their configs/cifar10.py): 32 blocks of width 128 without
    downsampling, dropout 0.1, Fourier features 2^6, 2^7, attention only in the middle. VDMNet's
    default time_range takes the log-SNR normalised with gamma_min = -13.3, gamma_max = 5."""
    return _section(name="vdm", ch=128, num_blocks=32, dropout=0.1, fourier_exponents=(6, 7), attention=False,
                    num_heads=1, num_groups=32, input_skip=True, zero_init_output=True, dtype="float32")


def digits_unet():
    """The default run's small UNet for the 8x8 scikit-learn digits: ch 32, mults (1, 2), attention
    at 4x4, 8 groups; trains to recognisable digits in minutes on 2 CPU cores."""
    return _unet(32, (1, 2), 2, (4,), 0.0, num_groups=8)


def digits_noisy_classifier():
    """The noise-conditional classifier of classifier guidance for the 8x8 digits: the encoder half of
    ``digits_unet`` (ch 32, mults (1, 2), 2 blocks per level, no attention but the middle one's) and a
    mean-pooled linear head (``models.noisy_classifier``)."""
    return _section(name="noisy_classifier", ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(),
                    dropout=0.0, num_heads=1, num_groups=8, dtype="float32")


def toy_mlp():
    """Time-conditioned MLP for 1-D and 2-D toy data: 3 SiLU layers of 128 units, t embedding 32."""
    return _section(name="mlp", hidden=128, depth=3, embed_dim=32, dtype="float32")


def step_heads_mlp128():
    """A 128-unit ReLU trunk with one output head per step, T = 40: seed 003's Swiss-roll network
    (formerly ``seed003_per_step_heads``)."""
    return _section(name="per_step_heads", num_steps=40, hidden=128, dtype="float32")


def mean_var_mlp4():
    """Separate mean and variance nets with one hidden layer of 4 ReLUs: seed 002's 1-D networks
    (formerly ``seed002_mean_var_nets``)."""
    return _section(name="mean_var_nets", hidden=4, dtype="float32")


PRESETS = {f.__name__: f for f in (ddpm_cifar10, adm64_unet256, mnist_unet128, lucidrains_unet64, vdm_cifar10,
                                   digits_unet, toy_mlp, step_heads_mlp128, mean_var_mlp4)}
CLASSIFIER_PRESETS = {f.__name__: f for f in (digits_noisy_classifier,)}  # models.build_classifier sections
