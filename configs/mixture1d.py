"""Seed 002: the 1-D mixture 1/3 N(-4, 1) + 2/3 N(4, 1) with separate mean and variance nets.

    python scripts/train.py --config=configs/mixture1d.py --workdir=runs/mixture1d

T = 250, constant beta = 0.02, 1,000 fixed training points, the two small
networks of the seed (learned free log-variance) trained on the full
variational bound (Ho et al. eq. 3 / the seed's loss).
Expected: a few minutes on a 2-core CPU; the histogram in samples/ shows both
modes with weights near 1/3 and 2/3; eval_bpd approaches the exact NLL.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.update(dict(source="toy", name="mixture1d", num_points=1000, num_test=1000))
    config.model = presets.seed002_mean_var_nets()
    config.diffusion.update(dict(schedule="constant", schedule_kwargs=dict(beta=0.02), T=250,
                                 parameterization="eps", variance="learned"))
    config.loss.name = "vlb"
    config.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.995))
    config.train.update(dict(num_steps=5000, batch_size=256, log_every=100, checkpoint_every=1000))
    config.eval.update(dict(every=1000, batch_size=500, elbo="exact", elbo_chunk=50))
    config.sample.update(dict(num_samples=2000, clip_x0=False))
    return config
