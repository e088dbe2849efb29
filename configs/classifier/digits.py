"""The noise-conditional classifier of classifier guidance for the default digits run.

    python scripts/train_classifier.py --config=configs/classifier/digits.py --workdir=runs/digits_classifier

The forward process (``diffusion``), data and seed are the default run's (configs/digits.py:
cosine schedule, T = 1000, the 1,500 training scans, 297 held out), so the classifier sees x_t at
every level the default model is trained and sampled on. Network: the ``digits_noisy_classifier``
preset (the encoder half of the digits UNet, ch 32, mults (1, 2), with a mean-pooled linear
head; models.noisy_classifier), taking (x_t, log-SNR). AdamW 2e-3 (warmup 200, cosine decay to
5%, clip 1), batch 64, EMA 0.999, 4,000 steps; every 1,000 steps the held-out accuracy at 11
levels t = 1, 101, ..., 1000. Measured: docs/results.md (classifier guidance).
"""
import ml_collections

from vdm import config as config_lib
from vdm.models import presets


def get_config():
    base = config_lib.defaults()
    c = ml_collections.ConfigDict()
    c.seed = base.seed
    c.data = base.data
    c.diffusion = base.diffusion
    c.model = presets.digits_noisy_classifier()
    c.optim = base.optim
    c.train = base.train
    c.train.update(dict(num_steps=4000, checkpoint_every=1000))
    c.eval = ml_collections.ConfigDict(dict(every=1000, batch_size=99, num_levels=11))
    return c
