"""Class-conditional DDPM on the embedded 8x8 digits, trained for classifier-free guidance.

    python scripts/train.py --config=configs/digits_conditional.py --workdir=runs/digits_conditional
    python scripts/sample.py --workdir=runs/digits_conditional --label=all --guidance_scale=1
    python scripts/evaluate.py --workdir=runs/digits_conditional --guidance_scale=0,0.5,1,2,4

configs/digits.py (the unconditional default: same network, T = 1000 cosine schedule,
eps prediction, simple loss, batch 64, 3,000 steps) with the digit labels as a class
embedding added to the time embedding (``data.conditional``) and the label replaced
by the null class with probability p_uncond = ``train.label_dropout`` = 0.1 (Ho &
Salimans 2022, Alg. 1), so one network gives both eps(x_t, c) and eps(x_t); the
training-time sample grids show digit i mod 10 in sample i (no guidance).
Measured: docs/results.md, "Class-conditional digits and classifier-free guidance".
"""
from configs.digits import get_config as digits_config


def get_config():
    config = digits_config()
    config.data.conditional = True
    config.train.label_dropout = 0.1
    return config
