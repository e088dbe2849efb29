"""Seed 003: the 2-D Swiss roll with a shared trunk and one output head per timestep.

    python scripts/train.py --config=configs/swissroll.py --workdir=runs/swissroll

T = 40 (sigmoid schedule), per-step heads predicting the mean (eps form) and a
free log-variance, trained on the full variational bound; the network gets
the integer step (time_input "t" with per_step_heads selects head t).
Expected: about 3 minutes on a 2-core CPU; samples/ shows the spiral.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.update(dict(source="toy", name="swissroll", num_test=1000))
    config.model = presets.seed003_per_step_heads()
    config.diffusion.update(dict(schedule="sigmoid", T=40, variance="learned"))
    config.loss.name = "vlb"
    config.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.995))
    config.train.update(dict(num_steps=5000, batch_size=256, log_every=100, checkpoint_every=1000))
    config.eval.update(dict(every=1000, batch_size=500, elbo="exact", elbo_chunk=40))
    config.sample.update(dict(num_samples=1000, clip_x0=False))
    return config
