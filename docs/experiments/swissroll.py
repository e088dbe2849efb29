"""Seed 003: the 2-D Swiss roll, T = 40, a shared ReLU trunk with one head per timestep
predicting the mean (eps form) and a free log-variance, trained on the variational bound.

    python scripts/train.py --config=docs/experiments/swissroll.py --workdir=runs/swissroll
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    c = config_lib.defaults()
    c.data.source, c.data.name, c.data.num_test = "toy", "swissroll", 5000
    c.model = presets.seed003_per_step_heads()
    if "time_range" in c.model:
        del c.model["time_range"]
    c.diffusion.schedule, c.diffusion.schedule_kwargs, c.diffusion.T = "sigmoid", {}, 40
    c.diffusion.variance, c.diffusion.parameterization = "learned", "eps"
    c.loss.name, c.loss.decoder = "vlb", "gaussian"
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = 2e-3, 100, 1.0
    c.train.num_steps, c.train.batch_size, c.train.steps_per_call = 15000, 256, 100
    c.train.log_every, c.train.checkpoint_every = 1000, 15000
    c.eval.every, c.eval.batch_size, c.eval.num_batches, c.eval.elbo = 15000, 1000, 1, "exact"
    c.eval.elbo_chunk = 40
    c.sample.num_samples = 0
    return c
