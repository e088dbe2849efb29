"""DDPM on CIFAR-10 (Ho et al. 2020): the 35.7M-parameter UNet, T = 1000 linear schedule.

    python scripts/train.py --config=configs/cifar10.py --workdir=runs/cifar10

eps prediction, L_simple, fixed_large variance, Adam 2e-4 with 5,000 warmup
steps, batch 128, grad clip 1, EMA 0.9999, random flips, dropout 0.1,
800k steps (paper). Expected: days on 8 accelerators (the paper: 10.6 hours
per 100k steps on a TPU v3-8); FID ~3.2 and <= 3.75 bits/dim at the end.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.update(dict(source="tfds", name="cifar10", random_flip=True, num_test=0))
    config.model = presets.ddpm_cifar10()
    config.diffusion.update(dict(schedule="linear", T=1000, variance="fixed_large"))
    config.optim.update(dict(lr=2e-4, warmup_steps=5000, decay="constant", b2=0.999, grad_clip=1.0,
                             ema_decay=0.9999))
    config.train.update(dict(num_steps=800000, batch_size=128, steps_per_call=10, log_every=1000,
                             checkpoint_every=10000, keep_checkpoints=3))
    config.eval.update(dict(every=10000, batch_size=256, num_batches=8))
    config.sample.update(dict(num_samples=64, num_steps=250))
    return config
