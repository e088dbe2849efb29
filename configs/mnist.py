"""Seed 004: MNIST (TFDS, padded to 32x32) with the seed's UNet, T = 500.

    python scripts/train.py --config=configs/mnist.py --workdir=runs/mnist \
        [--config.diffusion.parameterization=x0] [--config.diffusion.schedule=linear] \
        [--config.loss.loss_type=l1] [--config.diffusion.variance=fixed_small]

The seed's options map to config fields: target pred_eps/pred_x_0 ->
diffusion.parameterization, sigma upper/lower bound -> variance fixed_large /
fixed_small, noise schedule cosine/linear -> diffusion.schedule, loss l2/l1 ->
loss.loss_type; accelerated sampling -> sample.num_steps.
Expected: hours on a CPU, well under an hour on one GPU for 20k steps;
recognisable digits after a few thousand steps.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.update(dict(source="tfds", name="mnist", pad_to=32, num_test=0))
    config.model = presets.mnist_unet128()
    config.diffusion.update(dict(schedule="cosine", T=500))
    config.optim.update(dict(lr=2e-4, warmup_steps=500, decay="constant", ema_decay=0.9995))
    config.train.update(dict(num_steps=20000, batch_size=128, steps_per_call=10, log_every=100,
                             checkpoint_every=2000))
    config.eval.update(dict(every=2000, batch_size=256, num_batches=4))
    config.sample.update(dict(num_samples=64, num_steps=100))
    return config
