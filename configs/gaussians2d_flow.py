"""Flow matching on seed 004's 2-D mixture of two Gaussians (standardised).

    python scripts/train.py --config=configs/gaussians2d_flow.py --workdir=runs/gaussians2d_flow

configs/gaussians2d.py (the 3 x 128 SiLU MLP, batch 256, 3,000 steps) with the
rectified-flow path (the "flow" schedule), the velocity target u = eps - x_0
("flow"), the conditional flow-matching loss at uniform t, and Euler on the
uniform t grid from t = 1 (50 steps). eval_bpd is NaN (the VDM -ELBO needs finite
log-SNR ends); sample quality: scripts/evaluate.py --sample_metrics.
Expected: about 2 minutes on a 2-core CPU; two separated blobs in
samples/step_<N>.png.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()  # as configs/gaussians2d.py ...
    config.data.source, config.data.name, config.data.num_test = "toy", "gaussians2d", 1000
    config.model = presets.toy_mlp()
    config.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.995))
    config.train.update(dict(num_steps=3000, batch_size=256, log_every=100, checkpoint_every=1000))
    config.eval.update(dict(every=1000, batch_size=500, elbo_samples=16))
    config.sample.update(dict(num_samples=1000, clip_x0=False))
    # ... with the flow-matching path, target, loss and sampler.
    config.diffusion.update(dict(time="continuous", schedule="flow", T=0, parameterization="flow",
                                 variance="fixed_small", time_input="t"))
    config.loss.update(dict(name="simple", t_sampling="uniform"))
    config.sample.update(dict(sampler="flow", num_steps=50, spacing="linspace"))
    return config
