"""Variational Diffusion Model on scikit-learn's embedded 8x8 digits (draft; docstring completed below).

    python scripts/train.py --config=configs/digits_vdm.py --workdir=runs/digits_vdm
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.model = presets.vdm_cifar10()
    config.model.update(dict(ch=64, num_blocks=4, dropout=0.1, fourier_exponents=(1, 2, 3, 4, 5, 6, 7),
                             num_groups=8))
    config.diffusion.update(dict(time="continuous", schedule="learned", T=0, time_input="log_snr",
                                 schedule_kwargs=dict(log_snr_max=13.3, log_snr_min=-5.0, learn_endpoints=True)))
    config.loss.update(dict(name="vdm", antithetic=True))
    config.optim.update(dict(lr=2e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05, b2=0.99,
                             weight_decay=0.01, grad_clip=1.0, ema_decay=0.999))
    config.train.update(dict(num_steps=3000, batch_size=64, steps_per_call=10, log_every=100,
                             checkpoint_every=500, keep_checkpoints=2))
    config.eval.update(dict(every=500, batch_size=99, num_batches=0, elbo_samples=8))
    config.sample.update(dict(num_samples=64, num_steps=200))
    return config
