"""The default run: DDPM on scikit-learn's embedded 8x8 handwritten digits (no download).

    python scripts/train.py --workdir=runs/default    # configs/default.py is this config
    python scripts/train.py --config=configs/digits.py --workdir=runs/digits

The preset ``digits_unet`` made cheaper (ch 16, one block per level, no
attention) on the 1,500 training scans (297 held out), T = 1000 cosine
schedule, eps prediction, simple loss (Ho et al. 2020), fixed_large variance,
AdamW 2e-3 (warmup 200, cosine decay to 5%, gradient clip 1), batch 64,
EMA 0.999, 3,000 steps; eval every 1,000 steps: held-out loss, Monte-Carlo
-ELBO (8 samples per example) in bits/dim, 64 ancestral samples in
samples/step_<N>.png. Every field is ``vdm.config.defaults()``.
Measured: docs/results.md (about 5 minutes on a 2-core CPU; digits
recognisable in the last grid).
"""
from vdm import config as config_lib


def get_config():
    return config_lib.defaults()
