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

from configs import digits_vdm


def get_config():
    config = digits_vdm.get_config()
    config.model.update(dict(ch=32, num_blocks=2))
    config.diffusion.schedule_kwargs = ml_collections.ConfigDict()  # endpoints fixed at 13.3 and -5
    config.optim.warmup_steps = 100
    config.train.update(dict(num_steps=1000, checkpoint_every=1000, keep_checkpoints=1))
    config.eval.update(dict(every=1000, elbo_samples=16))
    config.sample.update(dict(num_samples=0, num_steps=100))
    return config
