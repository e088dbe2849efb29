"""EDM (Karras et al. 2022) on the embedded 8x8 digits: preconditioning, log-normal sigma, Heun.

    python scripts/train.py --config=configs/digits_edm.py --workdir=runs/digits_edm

The default digits run (configs/digits.py: the 164k-parameter UNet, batch 64,
3,000 steps, AdamW 2e-3, EMA 0.999) with the EDM recipe in continuous time: the
"edm" parameterization (c_skip, c_out, c_in with sigma_data = 0.5; the network
conditions on the log-SNR, an affine map of c_noise = ln(sigma)/4), the unit-weight
loss ||F - F_target||^2 (= lambda(sigma) ||D - x0||^2, lambda = 1/c_out^2) at
ln sigma ~ N(-1.2, 1.2^2), and the deterministic Heun sampler (``edm``, S_churn 0)
on the rho = 7 grid, 18 steps (35 network evaluations). The cosine log-SNR
schedule only maps t to levels (the loss draws sigma itself), and gives the
held-out -ELBO estimate of eval.
Expected: see docs/results.md (about 10 minutes on a 2-core CPU).
"""
from vdm import config as config_lib


def get_config():
    config = config_lib.defaults()
    config.diffusion.update(dict(time="continuous", schedule="cosine", T=0, parameterization="edm",
                                 variance="fixed_small", time_input="log_snr", sigma_data=0.5))
    config.loss.update(dict(name="simple", t_sampling="log_normal", t_loc=-1.2, t_scale=1.2))
    config.sample.update(dict(sampler="edm", num_steps=18, spacing="karras"))
    return config
