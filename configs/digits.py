"""DDPM on scikit-learn's embedded 8x8 handwritten digits (the default run; no download).

    python scripts/train.py --config=configs/digits.py --workdir=runs/digits

A small UNet (ch 32, mults 1,2, one block per level, no attention) on the
1,500 training scans, T = 1000 cosine schedule, eps prediction with the simple
loss (Ho et al. 2020), fixed_large variance, AdamW 2e-3 with warmup and cosine
decay, batch 128, EMA 0.999.
Expected: about 10 minutes on a 2-core CPU; the loss falls from ~1 to ~0.1X,
the test -ELBO reaches about X bits/dim, and runs/digits/samples/ shows
recognisable digits.
"""
import ml_collections

from vdm import data
from vdm.models import presets


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data.default_config()  # source="digits": 1500 train / 297 test 8x8 scans
    config.model = presets.digits_unet()
    config.diffusion = ml_collections.ConfigDict(dict(
        time="discrete", schedule="cosine", schedule_kwargs={}, T=1000, parameterization="eps",
        variance="fixed_large", time_input="t"))
    config.loss = ml_collections.ConfigDict(dict(
        name="simple", loss_type="l2", weighting="none", target="", snr_gamma=5.0, hybrid_lambda=1e-3,
        decoder="auto", importance_sampling=False, history=10, antithetic=True))
    config.optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05, weight_decay=0.0, b1=0.9, b2=0.99,
        eps=1e-8, grad_clip=1.0, accum_steps=1, ema_decay=0.999))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=4000, batch_size=128, steps_per_call=10, log_every=100, checkpoint_every=1000,
        keep_checkpoints=2, distributed=False, coordinator_address="", num_processes=1, process_id=0))
    config.eval = ml_collections.ConfigDict(dict(
        every=1000, batch_size=100, num_batches=0, elbo="mc", elbo_samples=8, elbo_chunk=50))
    config.sample = ml_collections.ConfigDict(dict(num_samples=64))
    return config
