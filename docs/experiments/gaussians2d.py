"""Seed 004's 2-D example: two Gaussians (standardized), T = 500 linear schedule, eps
prediction with the simple loss, fixed_large variance, the toy MLP.

    python scripts/train.py --config=docs/experiments/gaussians2d.py --workdir=runs/gaussians2d
"""
from configs import digits
from vdm.models import presets


def get_config():
    c = digits.get_config()
    c.data.source, c.data.name, c.data.num_test = "toy", "gaussians2d", 5000
    c.model = presets.toy_mlp()
    if "time_range" in c.model:
        del c.model["time_range"]
    c.diffusion.schedule, c.diffusion.schedule_kwargs, c.diffusion.T = "linear", {}, 500
    c.diffusion.variance, c.diffusion.parameterization = "fixed_large", "eps"
    c.loss.name, c.loss.decoder = "simple", "gaussian"
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = 2e-3, 100, 1.0
    c.train.num_steps, c.train.batch_size, c.train.steps_per_call = 5000, 256, 100
    c.train.log_every, c.train.checkpoint_every = 1000, 5000
    c.eval.every, c.eval.batch_size, c.eval.num_batches, c.eval.elbo = 5000, 1000, 1, "mc"
    c.sample.num_samples = 0
    return c
