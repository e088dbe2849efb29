"""Seed 004's 2-D mixture of two Gaussians (standardised), DDPM with a time-conditioned MLP.

    python scripts/train.py --config=configs/gaussians2d.py --workdir=runs/gaussians2d

MLP (3 x 128 SiLU), T = 500 linear schedule, eps prediction, simple loss,
fresh samples every step, batch 256, 3,000 steps.
Expected: about 2 minutes on a 2-core CPU; samples/step_<N>.png shows two
separated blobs; the held-out -ELBO approaches the exact NLL
(data.log_prob; eval_bpd is in bits per coordinate).
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.source, config.data.name, config.data.num_test = "toy", "gaussians2d", 1000
    config.model = presets.toy_mlp()
    config.diffusion.update(dict(schedule="linear", T=500, variance="fixed_large"))
    config.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.995))
    config.train.update(dict(num_steps=3000, batch_size=256, log_every=100, checkpoint_every=1000))
    config.eval.update(dict(every=1000, batch_size=500, elbo_samples=16))
    config.sample.update(dict(num_samples=1000, clip_x0=False))
    return config
