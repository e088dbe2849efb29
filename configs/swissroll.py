"""Seed 003: the 2-D Swiss roll with a shared trunk and one output head per timestep.

    python scripts/train.py --config=configs/swissroll.py --workdir=runs/swissroll

T = 40 (sigmoid schedule), a shared 128-unit ReLU trunk and per-step heads
predicting the mean (eps form) and a free log-variance ('learned'), trained on
the full variational bound; the network gets the integer step (head t).
Expected (docs/results.md): a few minutes on a 2-core CPU; samples on the
spiral, MMD and sliced Wasserstein at the data-vs-data noise floor.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    c = config_lib.defaults()
    c.data.update(dict(source="toy", name="swissroll", num_test=5000))
    c.model = presets.step_heads_mlp128()
    c.diffusion.update(dict(schedule="sigmoid", T=40, variance="learned", parameterization="eps"))
    c.loss.update(dict(name="vlb", decoder="gaussian"))
    c.optim.update(dict(lr=2e-3, warmup_steps=100, grad_clip=1.0))
    c.train.update(dict(num_steps=15000, batch_size=256, steps_per_call=100, log_every=1000,
                        checkpoint_every=15000))
    c.eval.update(dict(every=15000, batch_size=1000, num_batches=1, elbo="exact", elbo_chunk=40))
    c.sample.num_samples = 0
    return c
