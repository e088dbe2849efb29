"""Base of the VDM ablations on the digits (docs/results.md, "Variational Diffusion Models on
the digits"): configs/digits_vdm.py with a smaller VDMNet (width 32, 2 blocks) and the learned
schedule with its endpoints fixed at log-SNR 13.3 and -5 (the defaults of diffusion.schedule_kwargs,
shared by the fixed linear schedule and, for the DDPM runs, left to the cosine schedule), so that
one ablation's runs differ only in the field ablated. The steps come from scripts/ablate.py --steps:

    python scripts/train.py --config=configs/digits_vdm_ablation.py --workdir=runs/vdm_small
    python scripts/ablate.py --config=configs/digits_vdm_ablation.py --workdir=runs/ablate_vdm_T \\
        --steps=1000 --grid=diffusion.T=10,100,1000,0

(the other ablations' commands and results are in docs/results.md).
"""
import ml_collections

from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.model = presets.vdm_cifar10()
    config.model.update(dict(ch=32, num_blocks=2, dropout=0.1, fourier_exponents=(1, 2, 3, 4, 5, 6, 7),
                             num_groups=8))
    config.diffusion.update(dict(time="continuous", schedule="learned", T=0, time_input="log_snr",
                                 schedule_kwargs=ml_collections.ConfigDict()))
    config.loss.update(dict(name="vdm", antithetic=True))
    config.optim.update(dict(lr=2e-3, warmup_steps=100, decay="cosine", end_lr_factor=0.05, b2=0.99,
                             weight_decay=0.01, grad_clip=1.0, ema_decay=0.999))
    config.train.update(dict(num_steps=1000, batch_size=64, steps_per_call=10, log_every=100,
                             checkpoint_every=1000, keep_checkpoints=1))
    config.eval.update(dict(every=1000, batch_size=99, num_batches=0, elbo_samples=16))
    config.sample.update(dict(num_samples=0, num_steps=100))
    return config
