"""DDPM on scikit-learn's embedded 8x8 handwritten digits (no download).

    python scripts/train.py --config=configs/digits.py --workdir=runs/digits

The small UNet preset ``digits_unet`` on the 1,500 training scans (297 held
out), T = 1000 cosine schedule, eps prediction, simple loss (Ho et al. 2020),
fixed_large variance, AdamW 2e-3 (warmup 200, cosine decay), batch 128,
EMA 0.999, 4,000 steps; eval every 1,000 steps: held-out loss, Monte-Carlo
-ELBO in bits/dim, 64 ancestral samples in samples/step_<N>.png.
Expected: see the README (about 10 minutes on a 2-core CPU); digits
recognisable in the last grid.
"""
from vdm import config as config_lib


def get_config():
    return config_lib.defaults()
